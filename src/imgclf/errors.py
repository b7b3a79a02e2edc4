"""The one exception type users see: a message that names the file, key or line and the fix."""

import re


class ImgclfError(Exception):
    """A problem the user can fix; the CLI prints the message without a traceback."""


# torch.load's refusal advises weights_only=False (or allowlisting the class): advice a user
# must never follow for a file someone else made, so imgclf never repeats it
# (docs/RELIABILITY.md F4).
_ADVICE = ("weights_only", "safe_globals", "if you trust", "trusted source", "file an issue")
_ADVICE += ("Check the documentation", "Weights only load failed", "In PyTorch 2.6")


def torch_load_reason(err: BaseException) -> str:
    """What torch.load(weights_only=True) found wrong, without its advice to load unsafely."""
    text = re.sub(r"\x1b\[[0-9;]*m", "", str(err))  # torch bolds its advice in a terminal
    sentences = [s.strip() for s in re.split(r"(?<=\.)\s+|\n", text)]
    kept = [s for s in sentences if s and not any(a.lower() in s.lower() for a in _ADVICE)]
    return " ".join(kept) or "unsupported content"
