"""Sampling parameters, declared once.

Each entry of ``PARAMS`` is a scalar field that exists under the same name in the client's
``lightllm.v1.SamplingParams``, in ``SamplingOptions`` (what a validated request carries)
and in the shard's ``lightllm.shard.v1.RowSampling``. Request validation, the defaults of
unset fields and the shard message are all driven by this table, so a parameter cannot be
validated but never forwarded, or forwarded as a proto3 zero that means "on". Adding one is
a field in both protos, a row here, a ``SamplingOptions`` field and its use in the sampler;
``check_declared`` (run at import) fails loudly if any of those is missing.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import secrets
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from lightllm_grpc.proto import generation_pb2 as pb
from lightllm_grpc.proto import shard_pb2

log = logging.getLogger(__name__)
# Temperatures below this are greedy: logits / 1e-38 overflow float32 to inf, and a softmax
# over infs is NaN, which sampled token 0 over and over.
GREEDY_BELOW_TEMPERATURE = 1e-5
MAX_LOGIT_BIAS = 300
LOGIT_BIAS_RANGE = 100.0


@dataclass(frozen=True)
class Param:
    name: str
    # Used when neither the request nor the model's generation_config.json sets the field;
    # for all but temperature it is the value that turns the parameter off.
    default: float
    rule: str  # the valid range, as the error message states it
    valid: Callable[[float], bool]


PARAMS: tuple[Param, ...] = (
    Param("temperature", 1.0, "must be >= 0 (0 = greedy)", lambda v: v >= 0),
    Param("top_k", -1, "must be -1 (off) or >= 1", lambda v: v == -1 or v >= 1),
    Param("top_p", 1.0, "must be in (0, 1]", lambda v: 0 < v <= 1),
    Param("min_p", 0.0, "must be in [0, 1]", lambda v: 0 <= v <= 1),
    Param("repetition_penalty", 1.0, "must be in (0, 2]", lambda v: 0 < v <= 2),
    Param("presence_penalty", 0.0, "must be in [-2, 2]", lambda v: -2 <= v <= 2),
    Param("frequency_penalty", 0.0, "must be in [-2, 2]", lambda v: -2 <= v <= 2),
)
_DEFAULT = {p.name: p.default for p in PARAMS}


@dataclass(frozen=True)
class SamplingOptions:
    temperature: float = _DEFAULT["temperature"]
    top_k: int = int(_DEFAULT["top_k"])
    top_p: float = _DEFAULT["top_p"]
    min_p: float = _DEFAULT["min_p"]
    repetition_penalty: float = _DEFAULT["repetition_penalty"]
    presence_penalty: float = _DEFAULT["presence_penalty"]
    frequency_penalty: float = _DEFAULT["frequency_penalty"]
    seed: int | None = None
    # token id -> value added to its logit before sampling (greedy or sampled)
    logit_bias: Mapping[int, float] = dataclasses.field(default_factory=dict)


def check_value(param: Param, value: float, field: str) -> float:
    """``value`` if ``param`` allows it; else ValueError naming ``field``."""
    if not math.isfinite(value) or not param.valid(value):
        raise ValueError(f"{field} {param.rule}, got {value}")
    return value


def resolve(msg: pb.SamplingParams, defaults: SamplingOptions, vocab_size: int) -> SamplingOptions:
    """Validated options of a request: its set fields, ``defaults`` for the others.

    Raises ValueError naming the offending field.
    """
    values = {
        p.name: check_value(p, getattr(msg, p.name), f"sampling.{p.name}")
        for p in PARAMS
        if msg.HasField(p.name)
    }
    options = dataclasses.replace(
        defaults,
        **values,
        logit_bias=_logit_bias(msg.logit_bias, vocab_size),
        # An unseeded request gets a random seed, so every request's stream is reproducible
        # and independent of what else is in its batch.
        seed=msg.seed if msg.HasField("seed") else secrets.randbits(63),
    )
    if options.temperature < GREEDY_BELOW_TEMPERATURE:
        options = dataclasses.replace(options, temperature=0.0)
    return options


def _logit_bias(bias: Mapping[int, float], vocab_size: int) -> dict[int, float]:
    if len(bias) > MAX_LOGIT_BIAS:
        raise ValueError(f"sampling.logit_bias has {len(bias)} entries; at most {MAX_LOGIT_BIAS} are allowed")
    for token, value in bias.items():
        if token >= vocab_size:
            raise ValueError(f"sampling.logit_bias: id {token} is outside the vocabulary (size {vocab_size})")
        if not (math.isfinite(value) and -LOGIT_BIAS_RANGE <= value <= LOGIT_BIAS_RANGE):
            bound = f"{LOGIT_BIAS_RANGE:g}"
            raise ValueError(f"sampling.logit_bias[{token}] must be in [-{bound}, {bound}], got {value}")
    return dict(bias)


# generation_config.json keys that set a default; the other keys (do_sample, max_length, ...)
# are not read. Like vLLM, the values apply whatever do_sample says: a checkpoint that
# ships temperature 0.6 means it to be sampled at 0.6.
GENERATION_CONFIG_KEYS = ("temperature", "top_k", "top_p", "min_p", "repetition_penalty")


def generation_config_defaults(config: Mapping[str, Any]) -> tuple[SamplingOptions, list[str]]:
    """Defaults for unset sampling fields from a parsed generation_config.json, and a
    message for each value it holds that is out of range (that value is not used)."""
    by_name = {p.name: p for p in PARAMS}
    values: dict[str, Any] = {}
    problems: list[str] = []
    for key in GENERATION_CONFIG_KEYS:
        value = config.get(key)
        if value is None:
            continue
        if key == "top_k" and value == 0:  # transformers' spelling of "off"
            value = -1
        try:
            number = float(value)
        except (TypeError, ValueError):
            problems.append(f"generation_config.json {key}: {value!r} is not a number; ignored")
            continue
        try:
            values[key] = check_value(by_name[key], number, f"generation_config.json {key}")
        except ValueError as exc:
            problems.append(f"{exc}; ignored")
    if "top_k" in values:
        values["top_k"] = int(values["top_k"])
    return SamplingOptions(**values), problems


def model_defaults(folder: Path) -> SamplingOptions:
    """Defaults for unset sampling fields: the model folder's generation_config.json, where valid."""
    path = folder / "generation_config.json"
    try:
        config = json.loads(path.read_text()) if path.is_file() else {}
    except ValueError:
        log.warning("%s is not valid JSON; sampling defaults are the built-in ones", path)
        config = {}
    defaults, problems = generation_config_defaults(config if isinstance(config, dict) else {})
    for problem in problems:
        log.warning("%s", problem)
    return defaults


def to_params(options: SamplingOptions) -> pb.SamplingParams:
    """The options as the client API spells them (GetModelInfo's default_sampling)."""
    return pb.SamplingParams(**{p.name: getattr(options, p.name) for p in PARAMS})


def row_sampling(options: SamplingOptions, row: int) -> shard_pb2.RowSampling:
    """The shard's row state for these options: every parameter, set explicitly."""
    msg = shard_pb2.RowSampling(row=row, seed=options.seed if options.seed is not None else 0)
    for p in PARAMS:
        setattr(msg, p.name, getattr(options, p.name))
    for token, value in options.logit_bias.items():
        msg.logit_bias_ids.append(token)
        msg.logit_bias_values.append(value)
    return msg


def check_declared() -> None:
    """Every parameter is a field of the client proto, the options and the shard proto."""
    names = [p.name for p in PARAMS]
    option_fields = {f.name for f in dataclasses.fields(SamplingOptions)} - {"seed", "logit_bias"}
    where = {
        "lightllm.v1.SamplingParams": set(pb.SamplingParams.DESCRIPTOR.fields_by_name),
        "lightllm.shard.v1.RowSampling": set(shard_pb2.RowSampling.DESCRIPTOR.fields_by_name),
        "SamplingOptions": option_fields,
    }
    for place, fields in where.items():
        missing = [n for n in names if n not in fields]
        if missing:
            raise AssertionError(f"sampling parameters {missing} are not declared in {place}")
    if option_fields != set(names):
        raise AssertionError(f"SamplingOptions fields {sorted(option_fields - set(names))} are not in PARAMS")


check_declared()
