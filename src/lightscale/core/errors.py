"""Turn configuration and input errors into one line that names the key, file or value at fault.

jsonargparse reports a bad value inside a ``class_path`` as a nested list of every union member it tried;
the useful part is the chain of keys and the innermost reason. Users get that, not a usage wall.
"""

import re

_NOISE = (
    "Parser key",
    "Does not validate",
    "Subtypes:",
    "Errors:",
    "- Expected a <class 'NoneType'>",
    "Given value",
    "- Problem with given class_path",
)


class UserError(Exception):
    """A mistake in the command line, config or environment, reported as one line (exit code 2)."""


def one_line(message: str) -> str:
    """Condense a (possibly nested, multi-line) jsonargparse error message to a single line."""
    keys = re.findall(r'Parser key "([^"]+)"', message)
    class_paths = re.findall(r"Problem with given class_path '([^']+)'", message)
    given = re.search(r"Given value: (.*)", message)
    reasons = [line.strip() for line in message.splitlines() if line.strip() and not line.strip().startswith(_NOISE)]
    reason = reasons[0] if reasons else message.strip().splitlines()[0]
    if reason.startswith(keys[-1] if keys else "\0"):
        reason = reason[len(keys[-1]) :].lstrip(": ")
    reason = re.sub(r"^- Expected a <class '(\w+)'>", r"expected \1", reason).lstrip("- ")
    if reason.startswith("Parser key"):
        reason = reason.split(":", 1)[-1].strip()
    if given and not re.search(r"NestedArg|Namespace|[{\[(]", given.group(1)) and given.group(1) not in reason:
        reason += f", got {given.group(1)!r}"
    if class_paths and len(keys) <= 1:
        reason = f"class_path {class_paths[-1]!r}: {reason}"
    reason = re.sub(r"^unrecognized arguments: (fit|validate|test|predict) ", "unrecognized arguments: ", reason)
    if "arguments are required" in reason:
        reason += " (name them in a config, e.g. --config configs/experiment/digits.yaml, or with --model/--data)"
    if keys:
        return f"{'.'.join(keys)}: {reason}"
    return reason
