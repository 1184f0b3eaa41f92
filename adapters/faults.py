"""One fault plan for the MDR, Jira and ServiceNow simulators.

A `FaultPlan` is a list of `FaultRule`s plus two simulator-wide switches
(index lag and the connector account's time zone). Each rule selects
endpoints by HTTP method and a path pattern, fires with a probability and at
most `count` times, and draws from a seeded RNG so a run can be repeated.
`fault_middleware` applies the plan to an aiohttp app. The simulator passes
it a function naming each API request's endpoint, the error body its system
sends, and its clock for the `Date` header.

Rule kinds and where they act:

    rate_limit          before the handler: 429 with Retry-After in seconds or as an HTTP date
    server_error        before the handler: one of `statuses` (500, 502, 503, 504 by default)
    hang                before the handler: sleep `hang_seconds`, then answer normally;
                        when the client has gone by then, the handler does not run
    drop_after_commit   after the handler: the change is applied, then the connection is closed
    malformed_json      after the handler: the JSON reply is cut short, so it does not parse
    wrong_types         after the handler: numbers become strings, or objects below the top become lists
    cut_download        in a download handler, through `download_cut_bytes`: the body stops part way

Replies the handler answers with 4xx or 5xx, and streamed replies, are never
dropped or rewritten. Endpoints named in `drop_exempt` (MDR `session/confirm`)
never drop after commit, because a lost reply there breaks the token chain.
"""

from __future__ import annotations

import asyncio
import fnmatch
import json
import logging
import math
import random
from collections import Counter
from collections.abc import Awaitable, Callable, Collection
from email.utils import format_datetime
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Literal
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

import yaml
from aiohttp import web
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

log = logging.getLogger(__name__)

FaultKind = Literal[
    "rate_limit", "server_error", "hang", "drop_after_commit", "malformed_json", "wrong_types", "cut_download"
]
FAULT_KINDS: tuple[str, ...] = FaultKind.__args__  # type: ignore[attr-defined]
BEFORE_HANDLER = ("rate_limit", "server_error", "hang")
AFTER_HANDLER = ("drop_after_commit", "malformed_json", "wrong_types")
SERVER_ERROR_STATUSES = (500, 502, 503, 504)

# The options each kind takes besides the selector; any other option on a rule is an error.
KIND_OPTIONS: dict[str, frozenset[str]] = {
    "rate_limit": frozenset({"retry_after_seconds", "retry_after_format"}),
    "server_error": frozenset({"statuses"}),
    "hang": frozenset({"hang_seconds"}),
    "drop_after_commit": frozenset(),
    "malformed_json": frozenset(),
    "wrong_types": frozenset({"mutation"}),
    "cut_download": frozenset({"cut_fraction"}),
}
SELECTOR_FIELDS = frozenset({"kind", "method", "path", "probability", "count"})

# The (HTTP method, endpoint path) of an API request, or None for a control or other request.
EndpointOf = Callable[[web.Request], "tuple[str, str] | None"]
ErrorBody = Callable[[int, str], Any]
Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]

ENDPOINT_KEY = "fault_endpoint"


class FaultRule(BaseModel):
    """One switch: which endpoints, how often, and the fault's own options."""

    model_config = ConfigDict(extra="forbid", strict=True, validate_assignment=True)

    kind: FaultKind
    # An HTTP method such as POST, or "*" for any.
    method: str = "*"
    # A shell-style pattern over the endpoint: the route pattern (`/rest/api/2/issue/{issue}`),
    # the concrete path, or for MDR the API method (`incidents/list`). "*" is every API endpoint.
    path: str = "*"
    probability: float = Field(default=1.0, ge=0.0, le=1.0)
    # How many more times the rule may fire; None fires without limit.
    count: int | None = Field(default=None, ge=0)
    retry_after_seconds: int = Field(default=0, ge=0)
    retry_after_format: Literal["seconds", "http_date"] = "seconds"
    statuses: list[int] = Field(default_factory=lambda: list(SERVER_ERROR_STATUSES), min_length=1)
    # A hang longer than an hour only keeps the simulator from stopping.
    hang_seconds: float = Field(default=1.0, ge=0.0, le=3600.0)
    mutation: Literal["number_to_string", "object_to_list"] = "number_to_string"
    cut_fraction: float = Field(default=0.5, gt=0.0, lt=1.0)

    @field_validator("method")
    @classmethod
    def _upper_method(cls, value: str) -> str:
        return value.upper()

    @field_validator("statuses")
    @classmethod
    def _server_statuses(cls, value: list[int]) -> list[int]:
        wrong = [status for status in value if not 500 <= status <= 599]
        if wrong:
            raise ValueError(f"statuses must be 5xx codes, got {wrong}")
        return value

    @field_validator("hang_seconds")
    @classmethod
    def _finite_hang(cls, value: float) -> float:
        if not math.isfinite(value):
            raise ValueError("hang_seconds must be finite")
        return value

    @model_validator(mode="after")
    def _options_fit_kind(self) -> FaultRule:
        foreign = sorted(self.model_fields_set - SELECTOR_FIELDS - KIND_OPTIONS[self.kind])
        if foreign:
            raise ValueError(f"a {self.kind} rule takes no {', '.join(foreign)}")
        return self

    def selects(self, method: str, paths: Collection[str]) -> bool:
        """Tell whether the rule's selector covers a request and it has firings left."""
        if self.count is not None and self.count <= 0:
            return False
        if self.method != "*" and self.method != method.upper():
            return False
        return any(fnmatch.fnmatchcase(path, self.path) for path in paths)

    def to_json(self) -> dict[str, Any]:
        """Return the selector and only the options this kind takes."""
        wanted = SELECTOR_FIELDS | KIND_OPTIONS[self.kind]
        return self.model_dump(include=set(wanted))


class FaultSettings(BaseModel):
    """The plan as YAML, JSON or Python data: a seed, the rules and the simulator-wide switches."""

    model_config = ConfigDict(extra="forbid", strict=True)

    seed: int = 0
    rules: list[FaultRule] = Field(default_factory=list)
    # Above 0, a change shows in list and search queries only this many seconds later.
    index_lag_seconds: float | None = Field(default=None, ge=0.0)
    # The IANA zone of the connector's account in Jira and ServiceNow, which dates in queries are read in.
    service_time_zone: str | None = None

    @field_validator("service_time_zone")
    @classmethod
    def _known_zone(cls, value: str | None) -> str | None:
        if value is None:
            return value
        try:
            ZoneInfo(value)
        except (ZoneInfoNotFoundError, ValueError) as err:
            raise ValueError(f"unknown time zone {value!r}") from err
        return value


class FaultPlan:
    """The faults a simulator injects now, and how many replies each kind has spoiled."""

    def __init__(self, seed: int = 0) -> None:
        self.rules: list[FaultRule] = []
        self.fired: Counter[str] = Counter()
        self.index_lag_seconds: float | None = None
        self.service_time_zone: str | None = None
        # Called with the new zone when `configure` sets it, so the simulator can move its account.
        self.on_time_zone: Callable[[str], None] | None = None
        self.seed = seed
        self._random = random.Random(seed)

    def add(self, kind: str, **options: Any) -> FaultRule:
        """Add one rule, validated as `FaultRule`; raises ValueError on an unknown option or a bad value."""
        rule = _validated(FaultRule, {"kind": kind, **options})
        self.rules.append(rule)
        return rule

    def configure(self, data: Any) -> None:
        """Replace the plan with `data`, a `FaultSettings` or data of its shape, and restart the RNG and the counts.

        Nothing changes when `data` is invalid.
        """
        settings = data if isinstance(data, FaultSettings) else _validated(FaultSettings, data if data is not None else {})
        self.clear()
        self.seed = settings.seed
        self._random = random.Random(settings.seed)
        self.rules = list(settings.rules)
        self.index_lag_seconds = settings.index_lag_seconds
        if settings.service_time_zone is not None:
            self.set_time_zone(settings.service_time_zone)

    def set_time_zone(self, zone: str) -> None:
        _validated(FaultSettings, {"service_time_zone": zone})
        self.service_time_zone = zone
        if self.on_time_zone is not None:
            self.on_time_zone(zone)

    def clear(self) -> None:
        """End every fault and reset the counts; the account's time zone stays as it is."""
        self.rules.clear()
        self.fired.clear()
        self.index_lag_seconds = None

    def lag_seconds(self, default: float) -> float:
        """Return the index lag to use: the plan's when it sets one, else the simulator's own setting."""
        return default if self.index_lag_seconds is None else self.index_lag_seconds

    def to_json(self) -> dict[str, Any]:
        return {
            "seed": self.seed,
            "rules": [rule.to_json() for rule in self.rules],
            "index_lag_seconds": self.index_lag_seconds,
            "service_time_zone": self.service_time_zone,
            "fired": {kind: self.fired[kind] for kind in FAULT_KINDS},
        }

    def pick(self, kinds: Collection[str], method: str, paths: Collection[str]) -> FaultRule | None:
        """Return the first rule of `kinds` that selects the request and wins its draw, spending one of its count."""
        for rule in self.rules:
            if rule.kind not in kinds or not rule.selects(method, paths):
                continue
            # Every selected rule draws, so the same requests give the same faults on every run.
            if self._random.random() >= rule.probability:
                continue
            if rule.count is not None:
                rule.count -= 1
            return rule
        return None

    def choose(self, statuses: list[int]) -> int:
        """Pick a status for a server_error reply from the plan's RNG, so it repeats with the seed."""
        return statuses[0] if len(statuses) == 1 else self._random.choice(statuses)

    def record(self, rule: FaultRule, method: str, path: str) -> None:
        self.fired[rule.kind] += 1
        log.info("sim.fault.fired", extra={"kind": rule.kind, "method": method, "path": path})


# A plan is a handful of rules; a bigger file is a mistake, not a plan.
MAX_FAULT_FILE_BYTES = 1024 * 1024


def load_fault_file(path: Path) -> FaultSettings:
    """Read a fault plan from YAML with `safe_load`, validated strictly; raises ValueError naming the file."""
    try:
        size = path.stat().st_size
        if size > MAX_FAULT_FILE_BYTES:
            raise ValueError(f"{path}: the fault plan has {size} bytes, more than the limit of {MAX_FAULT_FILE_BYTES}")
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, yaml.YAMLError, RecursionError) as err:
        raise ValueError(f"{path}: cannot read the fault plan: {err}") from err
    try:
        return _validated(FaultSettings, data if data is not None else {})
    except ValueError as err:
        raise ValueError(f"{path}: {err}") from err


def _validated(model: type[BaseModel], data: Any) -> Any:
    try:
        return model.model_validate(data)
    except ValidationError as err:
        problems = "; ".join(
            f"{'.'.join(str(part) for part in error['loc']) or 'plan'}: {error['msg']}" for error in err.errors()
        )
        raise ValueError(f"invalid fault plan: {problems}") from None


def fault_middleware(
    plan: FaultPlan,
    *,
    endpoint_of: EndpointOf,
    error_body: ErrorBody,
    clock: Callable[[], float],
    drop_exempt: Collection[str] = (),
) -> Callable[[web.Request, Handler], Awaitable[web.StreamResponse]]:
    """Build the middleware that applies `plan` to the API requests `endpoint_of` names.

    `clock` returns the simulator's time in Unix seconds, for the `Date`
    header and an HTTP-date Retry-After.
    """

    @web.middleware
    async def middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
        endpoint = endpoint_of(request)
        if endpoint is None:
            return await handler(request)
        method, path = endpoint
        paths = (path, request.path)
        request[ENDPOINT_KEY] = (plan, method, paths)

        rule = plan.pick(BEFORE_HANDLER, method, paths)
        if rule is not None:
            plan.record(rule, method, path)
            if rule.kind != "hang":
                return _error_reply(rule, plan.choose(rule.statuses), error_body, clock())
            await asyncio.sleep(rule.hang_seconds)
            if request.transport is None or request.transport.is_closing():
                # The client has closed the connection and gets no reply, so nothing is applied.
                return web.Response(status=504)

        response = await handler(request)
        if not isinstance(response, web.Response) or response.status >= 400 or request.transport is None:
            return response
        kinds = [kind for kind in AFTER_HANDLER if not (kind == "drop_after_commit" and path in drop_exempt)]
        rule = plan.pick(kinds, method, paths)
        if rule is None:
            return response
        if rule.kind == "drop_after_commit":
            plan.record(rule, method, path)
            request.transport.close()
            return response
        spoiled = _spoiled_body(rule, response)
        if spoiled is None:
            return response
        plan.record(rule, method, path)
        return web.Response(body=spoiled, status=response.status, content_type="application/json")

    return middleware


def download_cut_bytes(request: web.Request, size: int) -> int:
    """Return where a `cut_download` rule stops this download's body, or 0 to send it whole.

    A download handler calls this once per download. The cut is at least
    one byte and short of `size`, so a file of under two bytes is never cut.
    """
    selected = request.get(ENDPOINT_KEY)
    if selected is None or size < 2:
        return 0
    plan, method, paths = selected
    rule = plan.pick(("cut_download",), method, paths)
    if rule is None:
        return 0
    plan.record(rule, method, paths[0])
    return min(size - 1, max(1, int(size * rule.cut_fraction)))


def _error_reply(rule: FaultRule, status: int, error_body: ErrorBody, now: float) -> web.Response:
    whole_now = math.floor(now)
    headers = {"Date": _http_date(whole_now)}
    if rule.kind == "server_error":
        return _json_reply(error_body(status, f"injected HTTP {status}"), status, headers)

    seconds = rule.retry_after_seconds
    if rule.retry_after_format == "seconds":
        headers["Retry-After"] = str(seconds)
    else:
        headers["Retry-After"] = _http_date(whole_now + seconds)
    return _json_reply(error_body(429, f"injected rate limit: retry after {seconds} seconds"), 429, headers)


def _json_reply(body: Any, status: int, headers: dict[str, str]) -> web.Response:
    return web.Response(text=json.dumps(body), status=status, content_type="application/json", headers=headers)


def _http_date(seconds: float) -> str:
    return format_datetime(datetime.fromtimestamp(seconds, timezone.utc), usegmt=True)


def _spoiled_body(rule: FaultRule, response: web.Response) -> bytes | None:
    """Return the rewritten body of a JSON reply, or None when the reply has no JSON body to spoil."""
    body = response.body
    if response.content_type != "application/json" or not isinstance(body, bytes) or not body:
        return None
    if rule.kind == "malformed_json":
        return body[: max(1, len(body) // 2)] + b'"\x00'
    try:
        data = json.loads(body)
    except ValueError:
        return None
    mutate = _numbers_to_strings if rule.mutation == "number_to_string" else _inner_objects_to_lists
    return json.dumps(mutate(data, top=True)).encode("utf-8")


def _numbers_to_strings(value: Any, *, top: bool = False) -> Any:
    """Replace every number with its text; `top` is unused and kept so both mutations share one signature."""
    if isinstance(value, bool) or value is None:
        return value
    if isinstance(value, int | float):
        return str(value)
    if isinstance(value, dict):
        return {key: _numbers_to_strings(item) for key, item in value.items()}
    if isinstance(value, list):
        return [_numbers_to_strings(item) for item in value]
    return value


def _inner_objects_to_lists(value: Any, *, top: bool = False) -> Any:
    if isinstance(value, dict):
        converted = {key: _inner_objects_to_lists(item) for key, item in value.items()}
        return converted if top else list(converted.values())
    if isinstance(value, list):
        return [_inner_objects_to_lists(item) for item in value]
    return value
