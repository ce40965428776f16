"""Shipped theme files (TOML). Installed as the package ``qexplorer.themes`` so that a
non-editable install carries them too; copy one into ``~/.config/qexplorer/themes/`` to edit it."""
