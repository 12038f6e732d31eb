"""The errors a run raises, and how a command line turns them into an exit code.

ConfigError (a user mistake: exit 2) lives in a module of its own so that data, partition
and checkpoints raise subclasses of it without importing the whole configuration (or
torch). RunFailed is a run that started and did not finish (exit 1, or 130 when
interrupted). Library code raises; only a command's main() calls fail().
"""
import re
import sys

# A URI's userinfo (s3://KEY:SECRET@bucket): everything from "scheme://" to the last "@"
# before a space, quote, "?" or "#", so a secret holding "/" (as AWS secret keys may) or an
# unescaped "@" is covered too. And query parameters that name a secret or a token.
_URI_USERINFO = re.compile(r"(?i)\b([a-z][a-z0-9+.-]*://)[^\s'\"?#]*@")
_SECRET_QUERY = re.compile(r"(?i)([?&](?:[a-z0-9_.-]*(?:secret|password|passwd|token|credential)[a-z0-9_.-]*"
                           r"|access_key|access_key_id|key)=)[^&\s'\"#]*")
REDACTED = "***"


def redact_secrets(text: object) -> str:
    """`text` with the userinfo of every URI in it (user:secret@) and every secret-like query
    value replaced by ***: an error message never repeats a credential."""
    return _SECRET_QUERY.sub(rf"\g<1>{REDACTED}", _URI_USERINFO.sub(rf"\g<1>{REDACTED}@", str(text)))


class ConfigError(ValueError):
    """A user mistake in the run's configuration; the CLI prints it as one line, with any
    credential in a URI it quotes redacted (redact_secrets)."""

    def __init__(self, *args):
        super().__init__(*(redact_secrets(a) if isinstance(a, str) else a for a in args))


class RunFailed(RuntimeError):
    """A run that started and did not finish: training failed (code 1), its final attack
    failed (1), or it was interrupted (130). Its summary.json already says so."""

    def __init__(self, message: str, code: int = 1):
        super().__init__(redact_secrets(message))
        self.code = code


def fail(message: str, code: int = 2) -> None:
    """A command's one-line error on stderr and its exit code (only a main() calls this)."""
    print(f"ray_fedat: error: {message}", file=sys.stderr)
    raise SystemExit(code)


def root_cause(exc: BaseException) -> str:
    """The innermost error's one-line message (Ray nests the worker's exception)."""
    seen = exc
    while True:
        inner = getattr(seen, "cause", None) or seen.__cause__
        if isinstance(inner, dict):  # worker rank -> exception
            inner = next(iter(inner.values()), None)
        if inner is None or inner is seen:
            break
        seen = inner
    worker_errors = getattr(exc, "worker_failures", None) or {}
    if seen is exc and worker_errors:
        seen = next(iter(worker_errors.values()))
    lines = [ln for ln in str(seen).strip().splitlines() if ln.strip()]
    return f"{type(seen).__name__}: {lines[-1] if lines else ''}"
