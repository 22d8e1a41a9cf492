"""Whether W&B can be reached from here: an API key for the server and a server (or proxy) that answers.

Standard library only, so that ``lightscale sync`` checks it without loading Lightning (a few seconds on a
login node), as the training CLI does before a run in online mode starts.
"""

import netrc
import os
import socket
from urllib.parse import urlparse

from lightscale.core.errors import UserError

REACH_TIMEOUT_S = 10.0


def _api_key_present(host: str) -> bool:
    """Whether ``wandb login`` (``~/.netrc``) or ``WANDB_API_KEY`` holds a key for ``host``."""
    if os.environ.get("WANDB_API_KEY"):
        return True
    try:
        return netrc.netrc(os.environ.get("NETRC")).authenticators(host) is not None
    except (OSError, netrc.NetrcParseError):
        return False


def check_online(base_url: str, timeout: float = REACH_TIMEOUT_S, purpose: str = "W&B online mode") -> None:
    """Fail in one line, before the run starts, when W&B online mode (or ``purpose``, e.g. an upload) cannot work:
    no API key, or the server (or the HTTPS proxy) does not answer. Left alone, ``wandb.init`` retries for ~100 s
    and ends in a traceback, and ``wandb sync`` retries for ever."""
    url = urlparse(base_url)
    host = url.hostname or base_url
    later = ", or log offline (mode: offline) and `wandb sync` the run later" if purpose == "W&B online mode" else ""
    if not _api_key_present(host):
        raise UserError(f"{purpose} needs an API key for {host}: run `wandb login` or set WANDB_API_KEY{later}")
    proxy = os.environ.get("HTTPS_PROXY") or os.environ.get("https_proxy")
    target = urlparse(proxy if proxy and "://" in proxy else f"http://{proxy}") if proxy else url
    address = (target.hostname or host, target.port or (443 if target.scheme == "https" else 80))
    try:
        socket.create_connection(address, timeout=timeout).close()
    except OSError as error:
        via = f" through the proxy {address[0]}" if proxy else ""
        raise UserError(
            f"{purpose} cannot reach {base_url}{via} ({error.strerror or error}): check the network{later}"
        ) from None
