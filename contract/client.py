"""Typed asyncio client of the GSLB API, for edgectl and the edge agent.

* `endpoints`: several API URLs (one per site); a request that fails to connect, times out
  or gets 502/503/504 is tried on the next one, and the client sticks to the one that
  answered. Writes are safe to repeat: each carries If-Match and an Idempotency-Key that
  stays the same across the attempts, so a write whose answer was lost is recognised as
  ours instead of coming back as a conflict.
* Errors are typed: `Conflict` carries the state someone else wrote (412), `BudgetRefused`
  the disruption-budget bounds a change would break (409), `NotFound`,
  `Forbidden`, `Unauthorized`, `InvalidRequest` (422, with the field), `Unavailable` (no
  endpoint answered).

From synchronous code (a CLI), wrap calls in `asyncio.run(...)`.
This module imports only httpx, pydantic and contract.schemas (import-linter checks it).
"""

from __future__ import annotations

import ssl
import uuid
from collections.abc import Mapping, Sequence
from typing import Any, TypeVar

import httpx
from pydantic import BaseModel, TypeAdapter, ValidationError

from contract.schemas import (
    NODE_CONTRACT_VERSION,
    BudgetBreach,
    Convergence,
    DesiredSpec,
    DesiredState,
    Drain,
    DrainKind,
    DrainRequest,
    EffectiveWeights,
    Event,
    EventPage,
    Heartbeat,
    NodeDesired,
    NodeObserved,
    NodeSpec,
    Problem,
    ServiceSpec,
    SiteSpec,
    WeightsUpdate,
)

T = TypeVar("T")
_RETRY_STATUSES = {502, 503, 504}
#: Per request. Longer than the API's own bound on a store call (gslb.yaml etcd `deadline_s`,
#: 5 s by default, plus one request timeout), so when the store is what is down the client
#: hears the API's 503 saying so instead of giving up first and blaming the API.
DEFAULT_TIMEOUT_S = 10.0


class ApiError(Exception):
    def __init__(self, status: int, detail: str, field: str | None = None) -> None:
        super().__init__(f"{status}: {detail}" + (f" (field {field})" if field else ""))
        self.status = status
        self.detail = detail
        self.field = field


class Unauthorized(ApiError):
    pass


class Forbidden(ApiError):
    pass


class NotFound(ApiError):
    pass


class InvalidRequest(ApiError):
    pass


class PreconditionRequired(ApiError):
    pass


class Conflict(ApiError):
    """412: the desired state moved since the revision the write was based on."""

    def __init__(self, current: DesiredState) -> None:
        super().__init__(412, f"revision mismatch (current revision {current.revision})")
        self.current = current


class ContractMismatch(ApiError):
    """The API publishes node views of another contract version than this client's."""


class BudgetRefused(ApiError):
    """409 from the disruption budget: `breaches` are the bounds the change would break."""

    def __init__(self, detail: str, breaches: list[BudgetBreach]) -> None:
        super().__init__(409, detail, "budget")
        self.breaches = breaches


class Unavailable(ApiError):
    """No endpoint answered (or all answered 502/503/504). `store`: every endpoint answered
    503, i.e. the API is up and says its state store is not."""

    def __init__(self, detail: str, *, store: bool = False) -> None:
        super().__init__(503, detail)
        self.store = store

    def describe(self) -> str:
        """One line for an operator, naming what is really down."""
        what = "the API's state store is unavailable" if self.store else "API unavailable"
        return f"{what}: {self.detail}"


_ERRORS: Mapping[int, type[ApiError]] = {
    401: Unauthorized,
    403: Forbidden,
    404: NotFound,
    422: InvalidRequest,
    428: PreconditionRequired,
}


def _problem(response: httpx.Response) -> Problem:
    try:
        return Problem.model_validate_json(response.content)
    except ValidationError:
        return Problem(detail=response.text[:200] or f"HTTP {response.status_code}")


def _raise_for(response: httpx.Response) -> None:
    if response.status_code < 400:
        return
    problem = _problem(response)
    if response.status_code == 412 and problem.current is not None:
        raise Conflict(problem.current)
    if response.status_code == 409 and problem.budget:
        raise BudgetRefused(problem.detail, problem.budget)
    error = _ERRORS.get(response.status_code, ApiError)
    raise error(response.status_code, problem.detail, problem.field)


class ApiClient:
    """Async client. Use as `async with ApiClient([...], token) as api:` or call `aclose()`."""

    def __init__(
        self,
        endpoints: Sequence[str],
        token: str | None = None,
        *,
        timeout_s: float = DEFAULT_TIMEOUT_S,
        verify: bool | str | ssl.SSLContext = True,
        transport: httpx.AsyncBaseTransport | None = None,
    ) -> None:
        if not endpoints:
            raise ValueError("at least one API endpoint is required")
        self.endpoints = [e.rstrip("/") for e in endpoints]
        self._current = 0
        self._timeout_s = timeout_s
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        if isinstance(verify, str):  # a CA file, e.g. the API's self-signed certificate
            verify = ssl.create_default_context(cafile=verify)
        self._http = httpx.AsyncClient(
            headers=headers, timeout=timeout_s, verify=verify, transport=transport
        )

    @property
    def current_endpoint(self) -> str:
        return self.endpoints[self._current]

    async def __aenter__(self) -> ApiClient:
        return self

    async def __aexit__(self, *_: object) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        await self._http.aclose()

    async def _request(
        self,
        method: str,
        path: str,
        *,
        params: Mapping[str, Any] | None = None,
        body: BaseModel | None = None,
        headers: Mapping[str, str] | None = None,
        timeout_s: float | None = None,
    ) -> httpx.Response:
        # An optional field left out (None) is not sent: an API of an older contract that
        # does not know it (`service` on a drain, `flowshare` in a heartbeat) takes the
        # request as before.
        content = body.model_dump_json(exclude_none=True).encode() if body is not None else None
        all_headers = dict(headers or {})
        if content is not None:
            all_headers["Content-Type"] = "application/json"
        failures: list[str] = []
        store_down = 0
        for attempt in range(len(self.endpoints)):
            index = (self._current + attempt) % len(self.endpoints)
            endpoint = self.endpoints[index]
            try:
                response = await self._http.request(
                    method,
                    endpoint + path,
                    params={k: v for k, v in (params or {}).items() if v is not None},
                    content=content,
                    headers=all_headers,
                    timeout=timeout_s if timeout_s is not None else self._timeout_s,
                )
            except httpx.HTTPError as exc:
                failures.append(f"{endpoint}: {type(exc).__name__}")
                continue
            if response.status_code in _RETRY_STATUSES:
                failures.append(
                    f"{endpoint}: HTTP {response.status_code} {_problem(response).detail}"
                )
                store_down += response.status_code == 503
                continue
            self._current = index
            _raise_for(response)
            return response
        if store_down == len(self.endpoints):
            raise Unavailable("; ".join(failures), store=True)
        raise Unavailable("no API endpoint answered: " + "; ".join(failures))

    async def _get(self, path: str, model: type[T] | TypeAdapter[T], **kwargs: Any) -> T:
        response = await self._request("GET", path, **kwargs)
        return _parse(response, model)

    async def _write(
        self,
        method: str,
        path: str,
        revision: int,
        body: BaseModel | None = None,
        override: str | None = None,
        params: Mapping[str, Any] | None = None,
    ) -> DesiredState:
        """`override`: the reason to write even though the disruption budget refuses it."""
        headers = {"If-Match": f'"{revision}"', "Idempotency-Key": uuid.uuid4().hex}
        if override is not None:
            headers["Budget-Override"] = override
        response = await self._request(method, path, body=body, headers=headers, params=params)
        return _parse(response, DesiredState)

    # --- desired state -----------------------------------------------------------------

    async def state(self) -> DesiredState:
        return await self._get("/v1/state", DesiredState)

    async def apply_state(
        self, spec: DesiredSpec, *, revision: int, override: str | None = None
    ) -> DesiredState:
        """Replace sites, nodes and services in one revision."""
        return await self._write("PUT", "/v1/state", revision, spec, override=override)

    async def watch_state(self, after_revision: int, timeout_s: float = 25.0) -> DesiredState:
        """Long-poll until the revision is above `after_revision` (or the timeout passes)."""
        return await self._get(
            "/v1/watch",
            DesiredState,
            params={"after_revision": after_revision, "timeout_s": timeout_s},
            timeout_s=timeout_s + self._timeout_s,
        )

    async def put_site(
        self, name: str, spec: SiteSpec, *, revision: int, override: str | None = None
    ) -> DesiredState:
        return await self._write("PUT", f"/v1/sites/{name}", revision, spec, override=override)

    async def delete_site(
        self, name: str, *, revision: int, override: str | None = None
    ) -> DesiredState:
        return await self._write("DELETE", f"/v1/sites/{name}", revision, override=override)

    async def put_node(
        self, name: str, spec: NodeSpec, *, revision: int, override: str | None = None
    ) -> DesiredState:
        return await self._write("PUT", f"/v1/nodes/{name}", revision, spec, override=override)

    async def delete_node(
        self, name: str, *, revision: int, override: str | None = None
    ) -> DesiredState:
        return await self._write("DELETE", f"/v1/nodes/{name}", revision, override=override)

    async def put_service(
        self, name: str, spec: ServiceSpec, *, revision: int, override: str | None = None
    ) -> DesiredState:
        return await self._write("PUT", f"/v1/services/{name}", revision, spec, override=override)

    async def delete_service(
        self, name: str, *, revision: int, override: str | None = None
    ) -> DesiredState:
        return await self._write("DELETE", f"/v1/services/{name}", revision, override=override)

    async def set_weights(
        self, update: WeightsUpdate, *, revision: int, override: str | None = None
    ) -> DesiredState:
        return await self._write("PUT", "/v1/weights", revision, update, override=override)

    async def drain(
        self,
        kind: DrainKind,
        name: str,
        reason: str,
        *,
        revision: int,
        override: str | None = None,
        service: str | None = None,
    ) -> DesiredState:
        """`override`: drain even though the disruption budget refuses it (the reason why);
        `service`: drain only that service on the node or site."""
        request = DrainRequest(kind=kind, name=name, reason=reason, service=service)
        return await self._write("POST", "/v1/drains", revision, request, override=override)

    async def undrain(
        self, kind: DrainKind, name: str, *, revision: int, service: str | None = None
    ) -> DesiredState:
        """`service`: end only that service's drain of the node or site."""
        params = {"service": service} if service is not None else None
        return await self._write("DELETE", f"/v1/drains/{kind}/{name}", revision, params=params)

    async def drains(self) -> list[Drain]:
        return await self._get("/v1/drains", TypeAdapter(list[Drain]))

    # --- nodes ---------------------------------------------------------------------

    async def heartbeat(self, node: str, heartbeat: Heartbeat) -> NodeDesired:
        # A node without flow sharing sends no `flowshare` key at all, so an API older
        # than the report (its schema forbids unknown fields) still records it.
        response = await self._request(
            "POST",
            f"/v1/nodes/{node}/heartbeat",
            body=heartbeat,
            params={"contract": NODE_CONTRACT_VERSION},
        )
        return _parse_node_view(response)

    async def node_desired(
        self,
        node: str,
        *,
        after_revision: int | None = None,
        fingerprint: str | None = None,
        timeout_s: float = 25.0,
    ) -> NodeDesired:
        """The node's desired view; with after_revision/fingerprint, a long-poll."""
        response = await self._request(
            "GET",
            f"/v1/nodes/{node}/desired",
            params={
                "after_revision": after_revision,
                "fingerprint": fingerprint,
                "timeout_s": timeout_s,
                "contract": NODE_CONTRACT_VERSION,
            },
            timeout_s=timeout_s + self._timeout_s,
        )
        return _parse_node_view(response)

    async def observed(self) -> list[NodeObserved]:
        return await self._get("/v1/observed", TypeAdapter(list[NodeObserved]))

    async def effective_weights(self) -> EffectiveWeights:
        return await self._get("/v1/effective-weights", EffectiveWeights)

    async def convergence(self) -> Convergence:
        return await self._get("/v1/convergence", Convergence)

    async def events(
        self, *, limit: int = 100, after: str | None = None, wait_s: float = 0
    ) -> list[Event]:
        page = await self._get(
            "/v1/events",
            EventPage,
            params={"limit": limit, "after": after, "wait_s": wait_s or None},
            timeout_s=wait_s + self._timeout_s,
        )
        return page.events


def _parse_node_view(response: httpx.Response) -> NodeDesired:
    """A node view, after checking its contract version: an API of another version gets one
    clear error instead of a field-by-field validation failure."""
    try:
        spoken = response.json().get("contract_version", 1)
    except (ValueError, AttributeError):
        spoken = None
    if spoken != NODE_CONTRACT_VERSION:
        raise ContractMismatch(
            response.status_code,
            f"the GSLB API publishes node contract version {spoken}; this client speaks "
            f"version {NODE_CONTRACT_VERSION}: upgrade the API (README: Upgrading)",
        )
    return _parse(response, NodeDesired)


def _parse(response: httpx.Response, model: type[T] | TypeAdapter[T]) -> T:
    adapter = model if isinstance(model, TypeAdapter) else TypeAdapter(model)
    try:
        return adapter.validate_json(response.content)
    except ValidationError as exc:
        raise ApiError(
            response.status_code, f"unexpected response: {exc.errors()[0]['msg']}"
        ) from None
