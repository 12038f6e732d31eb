"""The user-mistake exception, in a module of its own: data, partition and checkpoints
raise subclasses of it without importing the whole configuration (or torch)."""
import re

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
