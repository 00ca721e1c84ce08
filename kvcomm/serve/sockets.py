"""The listening sockets of an agent: bound before its model loads (``kvcomm serve``), or bound by a
launcher and inherited (``--fd``, :mod:`kvcomm.serve.launch`), and handed to uvicorn as they are."""

from __future__ import annotations

import socket

from kvcomm.errors import ConfigError

BACKLOG = 2048  # connections waiting to be accepted (uvicorn's default)


def listen(host: str, port: int) -> list[socket.socket]:
    """The agent's listening sockets, one per address ``host`` resolves to (as asyncio, and so
    uvicorn, binds a host's addresses; IPv6 ones for IPv6 alone), bound and listening before the
    store opens and the model loads, and handed to uvicorn: a port another process holds is
    refused at once, and no other process can take this one while the model loads (requests wait
    in the backlog until it serves).

    Raises:
        ConfigError: the port is not 0..65535, the host does not resolve, or the port cannot be
            bound on one of its addresses.
    """
    if not 0 <= port <= 65535:  # getaddrinfo would take it modulo 65536: another port
        raise ConfigError(f"cannot listen on port {port}: ports are 0..65535 (0: a free one the system picks)")
    try:
        infos = socket.getaddrinfo(host or None, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except OSError as err:
        raise ConfigError(f"cannot listen on {host}: {err}") from None
    addresses = {(family, address): (family, kind, proto) for family, kind, proto, _, address in infos}
    sockets: list[socket.socket] = []
    try:
        for (family, address), (_, kind, proto) in addresses.items():
            listening = socket.socket(family, kind, proto)
            sockets.append(listening)
            listening.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as uvicorn binds
            if family == socket.AF_INET6:  # beside an IPv4 socket on the same port
                listening.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
            listening.bind(address)
            listening.listen(BACKLOG)
    except OSError as err:
        for listening in sockets:
            listening.close()
        raise ConfigError(f"cannot listen on {host}:{port}: {err.strerror or err} (is another agent there?)") \
            from None
    return sockets


def inherited(fd: int) -> socket.socket:
    """The listening socket behind inherited file descriptor ``fd`` (``--fd``).

    Raises:
        ConfigError: ``fd`` is not open, is not a socket, or is not a TCP socket that listens.
    """
    try:
        held = socket.socket(fileno=fd)
    except OSError as err:
        raise ConfigError(f"--fd {fd}: not an open socket ({err.strerror or err})") from None
    held.set_inheritable(False)  # the agent's alone: a process it starts does not keep the port
    try:
        listens = held.getsockopt(socket.SOL_SOCKET, socket.SO_ACCEPTCONN) == 1
    except OSError:
        listens = False
    if held.family not in (socket.AF_INET, socket.AF_INET6) or held.type != socket.SOCK_STREAM \
            or not listens:
        held.detach()  # not this agent's to close
        raise ConfigError(f"--fd {fd}: not a TCP socket that listens (bind and listen() it before handing it over)")
    return held


def url_of(listening: socket.socket) -> str:
    """``http://address:port`` of a listening socket (an IPv6 address in brackets)."""
    address, port = listening.getsockname()[:2]
    return f"http://[{address}]:{port}" if listening.family == socket.AF_INET6 else f"http://{address}:{port}"
