"""The help screen (`?`): what each screen does and what each figure means."""

from __future__ import annotations

from textual.app import ComposeResult
from textual.binding import Binding
from textual.containers import VerticalScroll
from textual.screen import ModalScreen
from textual.widgets import Markdown

HELP_TEXT = """\
# qexplorer help

Press **Esc** or **?** to close. **Ctrl+P** opens the command palette (themes,
screens, quit). Everything works from the keyboard.

## Getting around

`d` dashboard · `m` models · `p` plan (precisions) · `j` jobs · `c` compare · `?` this help · `q` quit.
The app starts on the bundled model, SmolLM2-135M-Instruct.

**To run a benchmark:** press `p`, move to a precision and press `space` to
select it (BF16, INT8, Q8_0 and Q4_K_M start selected), then press `r`. The
jobs screen opens and shows each job's phase, progress and memory. `b` on the
plan screen switches between the full llama-bench measurement (pp512 / tg128 ×
5) and a quick one (pp64 / tg16 × 2).

## Dashboard (`d`)

Live memory, sampled in a background thread every second (`+` / `-` change the
interval from 0.25 s to 10 s, `space` pauses).

- **Unified pool** (GB10, Jetson): the GPU has no memory of its own. NVML's
  memory query answers *Not Supported* there, and tools that show
  *MemTotal − MemAvailable* as "GPU used" count every host allocation and the
  page cache. qexplorer shows **GPU** = the sum of each process's GPU
  allocation (NVML per-process figures), **other host** = host memory in use
  that is not a GPU allocation, and **available** = the kernel's MemAvailable,
  with **MemFree** beside it (red under 8 GiB): page cache from a checkpoint
  can take the free pages the GPU needs while MemAvailable still looks healthy,
  so a job whose load drives MemFree under 8 GiB and still falling is stopped.
- **VRAM** (discrete cards): NVML's total / used / free. If the card does not
  answer, memory is shown as *unavailable* - never host numbers.
- **Headroom** = MemAvailable − the safety reserve (default 8 GiB, `▒` on the
  bar; set `reserve_gib`). On unified memory, running out does not fail cleanly:
  boxes freeze. qexplorer plans and stops jobs against this figure.
- **page cache** is reclaimable (Cached − Shmem + SReclaimable); **shmem** and
  **mlocked** pages are not, and on GB10 they can be tens of GiB; **PSI** is the share of
  the last 10 s that tasks waited for memory (`/proc/pressure/memory`).
- The process table lists GPU processes, qexplorer's own jobs (`job`) and the
  largest host processes, sorted by memory.
- A **SIMULATED** tag means a demo profile (`--simulate gb10`, `h100`, `gh200`,
  `none`, `gb10-plunge`, `gb10-pagecache`, `gb10-container`, `gb10-shim`, `jetson`,
  `thor`): it changes only
  what is drawn (a fake NVML and host that the real formulas read); jobs are
  planned and guarded on the real machine, and their results say which profile
  was on screen.

## Models (`m`)

Every model qexplorer found without loading weights: the bundled model, paths
from the settings file (`models = [...]`) or `qexplorer models PATH`, the
Hugging Face cache, and GGUF files in LM Studio's and Ollama's folders. Type to
filter, `Enter` to pick. A model that cannot be read is listed with the reason.

## Plan (`p`)

One row per precision: **bpw** (bits per weight, scales included, averaged
over the whole model: embeddings and norms usually stay at higher precision),
**weights**, **total** = weights + KV cache + overhead, and the **margin**
against live headroom. Verdicts: *fits*, *tight* (margin under 10 % or 1 GiB),
*does not fit*. **runs here** says whether this machine runs it natively or
*emulated* (e.g. FP8 without FP8 tensor cores, INT4 on a CPU). All figures are
estimates until a run measures them.

`space` selects precisions to run, `r` runs them, `b` toggles the quick
benchmark, `D` cycles the context depths (llama-bench `-d`: pp and tg again
after that many prefilled tokens, within the planned context), `v` toggles
quality, `M` re-measures instead of showing stored results again, `[` / `]`
halve / double the context, `k` cycles the KV-cache dtype, `o` opens the run
options `qexplorer run` takes as flags (evaluation text, reference, quality
tokens and chunk length, threads, repetitions, engine arguments, order, force).
`l` adds a **load sweep** to each full job (off by default: it is long): the
artifact in its serving engine (vLLM with a slot per stream, llama-server with
`--parallel`) at concurrency 1, 2, 4, 8 - capped at the plan's capacity - with
TTFT / ITL percentiles, throughput, errors and the server's own `/metrics`,
stopped early at saturation, and the highest concurrency that meets the
objective (settings `slo_ttft_p99_s`, `slo_itl_p99_ms`; `qexplorer run --load`).
While a job is timed the screens stop redrawing their plots, so that the app
does not compete with the figure it shows; they catch up when it is taken.
A precision that does not fit is not queued. The **est. time** column and the
summary give each selected job's estimated duration, in the order they will
run: cheapest first (GGUF re-quantizations, then data-free schemes, calibrated
methods last). Estimates come from the model's size, the method and what
earlier jobs took on this machine; before any has, from defaults scaled by a
few-second calibration of this machine on first use (the label says which).
Shared work (dequantizing, the reference) counts once. Under `--simulate`
with a GPU profile (gb10, h100) the estimates are a **projection** from the
device's published figures; the detail line names what each phase rests on.

A precision measured for the first time gets a **quick pass** first (pp64 /
tg16 × 2, quality on 1024 tokens), so that every selected precision has an
answer within minutes; its compare row says "(quick)" until the full
measurement lands and replaces it (`qexplorer run --no-quick-pass` skips it).

## Jobs (`j`)

Each job quantizes the model to one precision and benchmarks it in its own
worker process, so a crash or an out-of-memory kill never takes the app. The
table shows each job's **peak RSS** (host memory of its process tree: the
worker and the vLLM server it starts) beside its **peak GPU** memory (NVML's
per-process figure for that tree; in a container, where NVML lists host PIDs,
the devices' growth since the job started). The plot shows both, the
planner's predicted peak as a line, and the machine's headroom on the
right-hand axis. A finished job compares its peak with the plan's matching
term: VRAM on a discrete card, RSS + GPU on unified memory and CPUs.
**The memory guard** reads the real machine (never a `--simulate` profile) and
stops a job when headroom falls below zero (MemAvailable under the reserve),
when headroom falls so fast it would reach zero within 3 s (GB10 loads can
drop 27 GiB in 9 s while MemAvailable still looks fine), or when a discrete
card's free memory runs out; it samples at 4 Hz while a job loads. `k`
cancels the selected job (`K` all); results land in the results store as
each job ends.

**left** is each job's estimated time left (the rest of its phase and the
phases after it), and the line above the progress bar the queue's; a finished
job shows how long it took beside its estimate, and both are stored so the
next estimate starts from this machine's numbers.

**Two jobs at once**: while one job runs untimed work (quantizing, a quality
pass, a vLLM start), the next one prepares beside it when both planned peaks
fit the headroom. A benchmark runs alone: every other job is paused (SIGSTOP)
until it ends, and the result names the jobs it paused.

**Reused**: a job whose artifact (SHA-256), engine, library versions, machine
and settings match a stored, quiet result shows that result again, dated,
instead of measuring it twice. `M` on the plan screen (or
`qexplorer run --remeasure`) measures again.

**Benchmark figures** follow llama-bench: a warm-up (the prompt and one token), then up to N repetitions of
prompt processing (pp, tokens/s) and generation (tg, tokens/s), mean ± sd;
the series stops after 3 once both means are known to 2 % (standard error),
and the count used is recorded with the result (a series stopped early reports
an sd about 10 % low: it stopped because its spread looked small);
TTFT is pp plus one decode step. *Roofline %* = decode tok/s × bytes read per
token ÷ memory bandwidth. Bytes read per token = the active weights (a MoE
reads its shared layers and top-k experts, an embedding table one row) + the
KV cache at the mean decode depth; bandwidth is the device's published figure
(GB10 273 GB/s) or, on a CPU, a copy test on the benchmark's thread count. A
value above 100 % is marked `!`: the bound is wrong there, not the speed.
*Native* means the engine has a kernel for the format on this device (the
label follows the kernel vLLM says it chose: its log lines are read for the
linear layers, the FP4 GEMMs and the MoE experts); *emulated* means it runs
through a generic path (FP8 on a CPU); *weight-only* (ʷ) means vLLM served a
format that quantizes activations through a weight-only kernel (Marlin: FP8
below CC 8.9, NVFP4 below CC 10), so speed and numerics are W8A16 / W4A16;
NVFP4A16 is weight-only by design (FP4-Marlin on every GPU, never the FP4
tensor cores); *dequantized* (†) means the transformers fallback expanded the
weights to BF16 - not serving speed.
llama.cpp runs with llama-bench's context parameters (flash attention auto,
batch 2048 / micro-batch 512, the same thread count for pp and tg).

**Depth**: every speed is measured at a context depth (0 unless `D` chose more);
deeper figures sit in the compare table's *deeper* column as `d2048 85±1 (61 %)`,
the last figure that depth's roofline (its own KV cache in the bytes per token).
**Noise** (`~` after a speed): while each speed was timed, other processes
used ≥ 10 % of the machine's CPU, or the repetitions spread by ≥ 5 % (CV). The
busy process is named in the result; re-run on a quiet machine before trusting
the figure.

## Quality

With quality on (`v` on the plan screen toggles it), each job also scores the
precision against the full-precision reference (BF16, dequantized once) on the
evaluation text: **KLD (top-256, lower bound)** (mean KL divergence of the
next-token distributions over the reference's 256 likeliest tokens plus one
lumped tail: a lower bound on the full KLD; lower is better), **top-1** (% of positions where both pick the same most
likely token), **PPL** (perplexity; the reference's beside it). The text is cut
into 512-token chunks and the second half of each chunk is scored, as
llama-perplexity does. If the reference was itself quantized (the bundled model
is a Q4_1 file), small differences mean little and the screen says so. The
reference runs on the job's device (a GPU job's reference on the GPU); a
reference reused from another device is named in the job's warnings. Each
quality figure is a mean ± its standard error; the reference's own row reads
"reference" (its KLD and top-1 are so by definition, not measured).

With the task pass on (`t` on the plan screen; `qexplorer run --tasks`), each
full job, after its benchmark and with the same engine, answers HumanEval
(programs scored in a sandbox; refused without network isolation unless
`--allow-unisolated-exec`, or its box in the options dialog `o`, which also
sets the items per task) and arithmetic chains, greedily, keeping every
item's outcome so that precisions are compared item by item (exact McNemar).
The compare screen shows each task's accuracy with its 95 % Wilson interval,
its recovery (accuracy ÷ the reference's; ▼ where the loss is significant) and
a plot of arithmetic accuracy by chain length; where no difference is
significant the exports say so in words ("no significant difference at 164
items", or that the model is too weak for the task).

## Compare (`c`)

Every measured precision of the current model, latest run each: memory, speed
(mean ± sd), roofline %, KLD, top-1, PPL (± SE), task accuracy; three plots
(decode speed, KLD, and KLD against memory with the Pareto frontier: nothing
else is both smaller and better), a fourth by chain length once tasks ran, and
output tok/s by concurrency once a row has a load sweep (`--load`; ◆ marks the
selected row's goodput). **streams in SLO** is that goodput: the highest
concurrency that met the service objective (TTFT p99, ITL p99, errors) and the
output tok/s of all streams there; "none" when no concurrency met it, "-"
without a load sweep. `s` sorts, `f` filters torch / GGUF, the selected row is highlighted
in every plot. The **recommendation** is chosen from the table: among every
measured precision that fits the live headroom and runs natively here (not a
fallback, not emulated), quality first → the lowest KLD, except a precision
whose task accuracy fell significantly below the reference's (the task veto;
the text says which figure decided); memory first → the
smallest with KLD ≤ 0.1; speed first → the fastest decode with KLD ≤ 0.1; CPU →
the fastest GGUF with KLD ≤ 0.1; serving → the most output tok/s within the
objective among those whose quality holds (KLD ≤ 0.1 and no significant task
loss; the text names any faster precision it passed over, and why). Results closer than the measurement can tell
apart (KLD within 2 standard errors of the difference - paired, position by
position, where both were scored on the same text - or 0.005; speeds within 2
standard errors or 2 %, goodputs alike) are
a tie, and only then does the seed's framework decide (FP8 on FP8 tensor cores,
AWQ / GPTQ, GGUF Q4_K_M / Q5_K_M on a CPU, quantized before the reference).
Noisy speeds rank after quiet ones and are named. `o` changes the priority;
the recommendation box scrolls (`tab` to it) when its text is longer than the
screen. `e` writes results.csv / .json / .md, `x` exports the selected
precision as a GGUF file (llama.cpp) or a compressed-tensors folder (vLLM) and
prints the command that serves it.

## Units

Memory is in binary units (GiB = 2³⁰ bytes), like `free -h` and nvitop.
"""


class HelpScreen(ModalScreen[None]):
    BINDINGS = [
        Binding("escape,question_mark,q", "dismiss", "Close"),
    ]

    def compose(self) -> ComposeResult:
        with VerticalScroll(id="help-body"):
            yield Markdown(HELP_TEXT)
