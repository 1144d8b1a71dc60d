"""The asynchronous transport on aiohttp: where aiohttp's errors become the worker's."""

from __future__ import annotations

import asyncio

import aiohttp

from ..errors import ConnectTimeout, IncompleteReply, ProviderError, ProviderTimeout
from .call import CompletionCall
from .exchange import Head, connection_error, past_deadline, reason
from .proxies import EnvironmentProxies


class AiohttpTransport:
    """One ``ClientSession`` (made on first use, on the running loop) with a bounded pool."""

    def __init__(self, max_connections: int) -> None:
        self.max_connections = max_connections
        self._session: aiohttp.ClientSession | None = None
        self._proxies = EnvironmentProxies()

    def _open_session(self) -> aiohttp.ClientSession:
        if self._session is None or self._session.closed:
            connector = aiohttp.TCPConnector(limit=self.max_connections, limit_per_host=0)
            # no cookies (as on the synchronous path): none rides along with other batches' items
            self._session = aiohttp.ClientSession(connector=connector, auto_decompress=False, trust_env=False,
                                                  cookie_jar=aiohttp.DummyCookieJar(),
                                                  timeout=aiohttp.ClientTimeout(total=None))
        return self._session

    async def open(self, url: str, data: bytes, headers: dict[str, str], call: CompletionCall,
                   read_timeout: float) -> AiohttpResponse:
        # connect: waiting for a free connection of the pool and connecting, up to the deadline
        timeout = aiohttp.ClientTimeout(total=None, connect=call.remaining(), sock_connect=call.connect_timeout,
                                        sock_read=read_timeout)
        try:
            response = await self._open_session().post(url, data=data, headers=headers, allow_redirects=False,
                                                       timeout=timeout, proxy=self._proxies.for_url(url))
        except aiohttp.ConnectionTimeoutError as exc:
            if past_deadline(call):
                raise ProviderTimeout("the item deadline passed while waiting for a connection") from exc
            raise ConnectTimeout(f"connect timeout after {call.connect_timeout:g}s") from exc
        except (aiohttp.ServerTimeoutError, asyncio.TimeoutError) as exc:
            raise ProviderTimeout(f"no reply within {read_timeout:g}s") from exc
        except aiohttp.ClientSSLError as exc:
            raise connection_error(url, exc, tls=True) from exc
        except (aiohttp.ClientError, OSError, ValueError) as exc:
            raise connection_error(url, exc) from exc
        return AiohttpResponse(response, read_timeout)

    async def aclose(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None


class AiohttpResponse:
    def __init__(self, response: aiohttp.ClientResponse, read_timeout: float) -> None:
        self._response = response
        self._read_timeout = read_timeout
        self._ended = False
        self.head = Head.of(response.status, response.reason, response.headers)

    async def read(self) -> bytes:
        try:
            data = await self._response.content.readany()
        except (aiohttp.ServerTimeoutError, asyncio.TimeoutError) as exc:
            raise ProviderTimeout(f"the reply stalled for more than {self._read_timeout:g}s") from exc
        except (aiohttp.ClientError, OSError) as exc:
            raise IncompleteReply(f"the connection broke before the reply ended: {reason(exc)}") from exc
        self._ended = not data
        return data

    async def close(self) -> None:
        if self._ended:
            self._response.release()  # read to its end: the connection goes back to the pool
        else:
            self._response.close()


__all__ = ["AiohttpTransport", "ProviderError"]
