"""The asynchronous transport on httpx: where httpx's errors become the worker's."""

from __future__ import annotations

from collections.abc import AsyncIterator

import httpx

from ..errors import IncompleteReply, ProviderTimeout
from .call import CompletionCall
from .exchange import Head, connection_error, reason


class HttpxTransport:
    """One ``AsyncClient`` with a bounded pool (made on first use, on the running loop)."""

    def __init__(self, max_connections: int) -> None:
        self.max_connections = max_connections
        self._client: httpx.AsyncClient | None = None

    def _open_client(self) -> httpx.AsyncClient:
        if self._client is None or self._client.is_closed:
            limits = httpx.Limits(max_connections=self.max_connections,
                                  max_keepalive_connections=self.max_connections)
            self._client = httpx.AsyncClient(limits=limits, trust_env=True, follow_redirects=False, timeout=None)
        return self._client

    async def open(self, url: str, data: bytes, headers: dict[str, str], call: CompletionCall,
                   read_timeout: float) -> HttpxResponse:
        client = self._open_client()
        timeout = httpx.Timeout(connect=call.connect_timeout, read=read_timeout, write=read_timeout,
                                pool=call.remaining())
        try:
            request = client.build_request("POST", url, content=data, headers=headers, timeout=timeout)
            response = await client.send(request, stream=True, follow_redirects=False)
        except httpx.PoolTimeout as exc:
            raise ProviderTimeout("the item deadline passed while waiting for a connection") from exc
        except httpx.ConnectTimeout as exc:
            raise ProviderTimeout(f"connect timeout after {call.connect_timeout:g}s") from exc
        except httpx.TimeoutException as exc:
            raise ProviderTimeout(f"no reply within {read_timeout:g}s") from exc
        except (httpx.HTTPError, httpx.InvalidURL, OSError) as exc:
            raise connection_error(url, exc) from exc
        return HttpxResponse(response, read_timeout)

    async def aclose(self) -> None:
        if self._client is not None:
            await self._client.aclose()
            self._client = None


class HttpxResponse:
    def __init__(self, response: httpx.Response, read_timeout: float) -> None:
        self._response = response
        self._read_timeout = read_timeout
        self._chunks: AsyncIterator[bytes] = response.aiter_raw()
        self.head = Head.of(response.status_code, response.reason_phrase, response.headers)

    async def read(self) -> bytes:
        try:
            return await anext(self._chunks)
        except StopAsyncIteration:
            return b""
        except httpx.TimeoutException as exc:
            raise ProviderTimeout(f"the reply stalled for more than {self._read_timeout:g}s") from exc
        except (httpx.HTTPError, OSError) as exc:
            raise IncompleteReply(f"the connection broke before the reply ended: {reason(exc)}") from exc

    async def close(self) -> None:
        await self._response.aclose()


__all__ = ["HttpxTransport"]
