"""How the commands end on a failure: one line naming the argument or file and the fix, never a
deep traceback (docs: README, "When something goes wrong"). A module of its own so every command
module (cli_model, cli_export) can import it without importing the others."""

from __future__ import annotations

import errno
import functools
from typing import Callable

import typer

#: Commands whose finished units are kept, so that the same command resumes them.
RESUMABLE = ("quantize_cmd", "run_cmd", "demo_cmd")
#: What to do about a disk error, by errno.
DISK_HINTS = {errno.ENOSPC: "disk full: free space or choose another --out",
              errno.EDQUOT: "disk quota exceeded: free space or choose another --out",
              errno.EFBIG: "file too large for this file system: choose an --out on one that allows large files"}


def friendly_errors(command: Callable) -> Callable:
    """Bad input (ValueError) → typer usage error naming the argument (exit 2); disk errors and
    running out of memory → one clear line and exit 1; Ctrl-C → one line and exit 130. Never a
    deep traceback for the user's mistakes or the machine's limits."""
    resumable = command.__name__ in RESUMABLE
    kept = "; finished layers and blocks are kept and the same command resumes the run" if resumable else ""

    @functools.wraps(command)
    def wrapper(*args, **kwargs):
        try:
            return command(*args, **kwargs)
        except ValueError as e:
            raise typer.BadParameter(str(e)) from None
        except KeyboardInterrupt:
            typer.echo(f"interrupted{kept or '; nothing was kept: run the command again'}", err=True)
            raise typer.Exit(130) from None
        except OSError as e:
            hint = DISK_HINTS.get(e.errno)
            typer.echo(f"error: {e}" + (f" ({hint}{kept})" if hint else kept), err=True)
            raise typer.Exit(1) from None
        except (MemoryError, RuntimeError) as e:
            # torch.cuda.OutOfMemoryError is a RuntimeError; matched by name so this module needs no torch
            gpu = type(e).__name__ == "OutOfMemoryError"
            if not (gpu or isinstance(e, MemoryError)):
                raise
            where = "GPU" if gpu else "host"
            first = str(e).splitlines()[0][:200] if str(e) else type(e).__name__
            typer.echo(f"error: out of {where} memory ({first}); pass fewer --nsamples or a shorter --seqlen "
                       "(or --device cpu when the GPU's memory is short); finished layers and blocks are kept "
                       "and the same command resumes", err=True)
            raise typer.Exit(1) from None
    return wrapper
