"""Follow systemd/README.md in a booted Debian 12 container: `make runbook` (as root).

container.py builds and boots the container, steps.py knows every `sh` block of the runbook and
checks what each step promises, __main__.py runs them in order and prints a summary.
"""
