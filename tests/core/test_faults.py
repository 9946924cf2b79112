"""Whose fault a local socket error is: the errno tables, without a socket."""

from __future__ import annotations

import errno

import pytest

from loble.core import ACCEPT_SKIP_ERRNOS, SHORTAGE_ERRNOS, is_shortage, skips_one_client

SHORTAGES = [errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM]
SKIPS = [errno.ECONNABORTED, errno.EPROTO, errno.EPERM]
OTHERS = [errno.ECONNREFUSED, errno.EAFNOSUPPORT, errno.ENETUNREACH, errno.EINVAL, errno.EBADF]


def test_the_tables_are_exactly_these() -> None:
    assert frozenset(SHORTAGES) == SHORTAGE_ERRNOS
    assert frozenset(SKIPS) == ACCEPT_SKIP_ERRNOS


@pytest.mark.parametrize("number", SHORTAGES, ids=errno.errorcode.get)
def test_running_out_of_descriptors_or_memory_is_our_shortage(number: int) -> None:
    assert is_shortage(number)
    assert not skips_one_client(number)  # at accept it pauses: retrying at once would spin


def test_an_address_not_available_blames_the_address_not_us() -> None:
    # EADDRNOTAVAIL also means an address family switched off on this host:
    # a real failure to reach that address, not a shortage of ours.
    assert not is_shortage(errno.EADDRNOTAVAIL)


@pytest.mark.parametrize("number", SKIPS, ids=errno.errorcode.get)
def test_accept_errors_about_one_client_skip_it(number: int) -> None:
    assert skips_one_client(number)
    assert not is_shortage(number)


@pytest.mark.parametrize("number", [*OTHERS, None], ids=lambda n: errno.errorcode.get(n, str(n)))
def test_anything_else_is_neither(number: int | None) -> None:
    # None: an OSError with no errno is handled the careful way.
    assert not is_shortage(number)
    assert not skips_one_client(number)
