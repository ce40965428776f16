"""A small modal that asks for the address of a running OpenAI-compatible server."""

from __future__ import annotations

from textual import on
from textual.app import ComposeResult
from textual.binding import Binding
from textual.containers import Vertical
from textual.screen import ModalScreen
from textual.widgets import Input, Static


class ServerTargetScreen(ModalScreen[str | None]):
    BINDINGS = [Binding("escape", "dismiss", "Cancel")]

    def compose(self) -> ComposeResult:
        from qexplorer.core.domain.spec import ServerSpec

        spec = ServerSpec("")
        levels = ", ".join(str(level) for level in spec.levels)
        with Vertical(id="server-dialog"):
            yield Static("[b]Benchmark a running server[/b] (vLLM, llama-server, SGLang: OpenAI-compatible)\n"
                         f"llama-benchy's method: concurrency {levels} × {spec.repetitions} repetitions, unique "
                         f"{spec.prompt_tokens}-token prompts, {spec.max_tokens} tokens each. An API key is read "
                         "from the environment by `qexplorer bench-server --api-key-env`; none is stored.")
            yield Input(placeholder="http://127.0.0.1:8000", id="server-url")

    @on(Input.Submitted, "#server-url")
    def _submit(self, event: Input.Submitted) -> None:
        value = event.value.strip()
        if not value.startswith(("http://", "https://")):
            self.notify("Give an http:// or https:// address.", severity="warning")
            return
        self.dismiss(value)
