"""Server configuration: one frozen dataclass, validated once, from the command line."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

ADMISSION_RULES = ("past-future", "conservative")
SCHEDULING_POLICIES = ("fcfs", "priority")
DEVICES = ("auto", "cpu", "cuda")
DTYPES = ("auto", "float32", "bfloat16", "float16")
LOAD_FORMATS = ("auto", "safetensors", "dummy")
QUANTIZATIONS = ("fp8",)
# --kv-cache-dtype: auto = the model dtype; fp8_e4m3 = e4m3 with per-layer scales (half the bytes).
KV_CACHE_DTYPES = ("auto", "fp8_e4m3")
# Rows (the largest batch, --max-running-requests) when none is given. Each row costs its
# req_to_token line, sampler state, a logits row and its share of the decode graphs: 1,024 rows
# left an 8B model 0.6% less KV pool than 512 (0.7 GiB, 128k vocabulary). On a card of 64 GiB or more
# that buys throughput (W2 against 512 rows, one H200: +1.5% bf16, +2.3% FP8; BENCHMARKS.md);
# smaller cards, where that memory is KV, and CPUs keep 256 (shard/memory.default_max_rows).
DEFAULT_ROWS = 256
LARGE_DEVICE_ROWS = 1024
LARGE_DEVICE_GIB = 64
# Every shard process runs with these, set before CUDA or NCCL starts: no NVLink multicast
# (NVLS) in NCCL nor in symmetric memory. The P2P all-reduce never uses it, and creating
# multicast objects fails or hangs on some drivers and virtualised hosts (docs/multihost.md).
NO_MULTICAST_ENV = {"NCCL_NVLS_ENABLE": "0", "TORCH_SYMM_MEM_DISABLE_MULTICAST": "1"}


def check_tls_flags(cert: Path | None, key: Path | None, client_ca: Path | None) -> None:
    """A TLS server's flags (``serve`` and ``shard``): cert and key together, a client CA only
    beside them, every file present."""
    if (cert is None) != (key is None):
        raise ValueError("--tls-cert and --tls-key go together")
    if client_ca is not None and cert is None:
        raise ValueError("--tls-client-ca (mutual TLS) needs --tls-cert and --tls-key")
    _check_files({"--tls-cert": cert, "--tls-key": key, "--tls-client-ca": client_ca})


def _check_files(flags: dict[str, Path | None]) -> None:
    for flag, path in flags.items():
        if path is not None and not path.is_file():
            raise ValueError(f"{flag} {path}: no such file")


@dataclass(frozen=True)
class SchedulerConfig:
    """What the scheduler needs: capacities and per-step budgets."""

    # None: the shards' rows (ShardConfig.max_rows).
    max_running_requests: int | None = None
    max_waiting_requests: int = 4096
    # Most prompt tokens prefilled in one step; longer prompts are split into chunks.
    max_prefill_tokens: int = 8192
    # Per-step time budget (docs/scheduling.md): a step with decode rows takes only the
    # prefill tokens a learned step-time model says fit within this many ms (at least
    # min_prefill_tokens when prompts wait; never more than max_prefill_tokens).
    # 0: off, every step takes up to max_prefill_tokens. Off by default: at 50 ms on an H200 (W3,
    # BENCHMARKS.md) it lowered TTFT p99 and raised TPOT p99, not the trade it is for.
    step_time_budget_ms: float = 0.0
    min_prefill_tokens: int = 512
    default_max_new_tokens: int = 256
    # Stream messages sent per step, at most about: past it, each stream's tokens are
    # coalesced into fewer, larger messages (gRPC's per-message cost bounds throughput).
    max_messages_per_step: int = 128
    # Reuse cached prefixes (radix cache over KV slots); off = every prompt is prefilled.
    prefix_cache: bool = True
    # How admission bounds the batch's KV (docs/scheduling.md).
    admission: str = "past-future"
    # Past-Future: quantile of the longer past output lengths taken as a request's length.
    admission_quantile: float = 0.6
    scheduling_policy: str = "fcfs"
    # Most completions one request may ask for (GenerateRequest.n).
    max_n: int = 16
    # Decode steps whose rows share cached prefixes of at least this many tokens in all
    # (rows x prefix length) use cascade attention (0: whenever rows share one).
    cascade_min_shared_tokens: int = 32768

    def running_rows(self, shard_rows: int) -> int:
        """The batch the scheduler may run beside shards of ``shard_rows`` rows."""
        if self.max_running_requests is None:
            return shard_rows
        return min(shard_rows, self.max_running_requests)

    def __post_init__(self) -> None:
        if self.admission not in ADMISSION_RULES:
            raise ValueError(f"admission must be one of {ADMISSION_RULES}, got {self.admission!r}")
        if self.scheduling_policy not in SCHEDULING_POLICIES:
            raise ValueError(
                f"scheduling_policy must be one of {SCHEDULING_POLICIES}, got {self.scheduling_policy!r}"
            )
        if not 0.0 <= self.admission_quantile <= 1.0:
            raise ValueError("admission_quantile must be in [0, 1]")
        if self.max_n < 1:
            raise ValueError("max_n must be >= 1")
        for name in ("max_running_requests", "max_waiting_requests", "max_prefill_tokens"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise ValueError(f"{name} must be >= 1")
        if not self.step_time_budget_ms >= 0:
            raise ValueError("step_time_budget_ms must be >= 0 (0: off)")
        if self.min_prefill_tokens < 1:
            raise ValueError("min_prefill_tokens must be >= 1")
        if self.default_max_new_tokens < 1:
            raise ValueError("default_max_new_tokens must be >= 1")
        if self.max_messages_per_step < 1:
            raise ValueError("max_messages_per_step must be >= 1")


@dataclass(frozen=True)
class ShardConfig:
    """What every shard process is started with."""

    model: Path
    device: str = "auto"
    dtype: str = "auto"
    load_format: str = "auto"
    # "fp8": quantize a high-precision checkpoint's linear layers at load; None: the
    # checkpoint's own (an FP8 checkpoint is recognized by its config.json).
    quantization: str | None = None
    # "fp8_e4m3": the KV pool in e4m3 with per-layer scales from the checkpoint (1.0 without),
    # twice the tokens in the same memory; "auto": the model dtype (docs/quantization.md).
    kv_cache_dtype: str = "auto"
    tp_size: int = 1
    max_total_tokens: int | None = None  # KV pool size in tokens; None = sized from memory
    # The largest batch (req_to_token rows); None: by the device (shard/memory.default_max_rows).
    max_rows: int | None = None
    max_context: int | None = None  # None = the model's context length
    gpu_memory_fraction: float = 0.9
    cuda_graphs: bool = True
    # One-sequence prefills of up to this many new tokens replay CUDA graphs captured per
    # token-count bucket (shard/prefill_graph.py); 0: every prefill runs eagerly. Needs cuda_graphs.
    cuda_graph_max_prefill_tokens: int = 512
    # Other prefill steps and mixed (prefill + decode) steps of up to this many tokens run the
    # model as piecewise CUDA graphs with attention eager between them, per token-count bucket
    # (shard/piecewise_graph.py); 0: they run eagerly. Needs cuda_graphs. 512: measured on an
    # H200 (8B, bf16), graphs win up to ~512 tokens (launch-bound steps, 1.4-2.4x) and lose
    # above (1,032-1,280 tokens: 0.77-0.95x of eager), BENCHMARKS.md.
    cuda_graph_max_mixed_tokens: int = 512
    # TP > 1 on GPU: small all-reduces over P2P symmetric memory; False: NCCL for all sizes.
    custom_all_reduce: bool = True
    # With it, messages up to 512 KiB take the barrier-free P2P path, which the norm kernels
    # that read the sum run inside themselves (no all-reduce launch); False: its own kernels.
    fused_all_reduce: bool = True
    # Largest prefill the coordinator sends; sizes the activation peak when profiling memory.
    max_prefill_tokens: int = 8192

    def __post_init__(self) -> None:
        if self.device not in DEVICES:
            raise ValueError(f"device must be one of {DEVICES}, got {self.device!r}")
        if self.dtype not in DTYPES:
            raise ValueError(f"dtype must be one of {DTYPES}, got {self.dtype!r}")
        if self.load_format not in LOAD_FORMATS:
            raise ValueError(f"load_format must be one of {LOAD_FORMATS}, got {self.load_format!r}")
        if self.quantization is not None and self.quantization not in QUANTIZATIONS:
            raise ValueError(f"quantization must be one of {QUANTIZATIONS}, got {self.quantization!r}")
        if self.kv_cache_dtype not in KV_CACHE_DTYPES:
            raise ValueError(f"kv_cache_dtype must be one of {KV_CACHE_DTYPES}, got {self.kv_cache_dtype!r}")
        if self.tp_size < 1:
            raise ValueError("tp_size must be >= 1")
        if self.max_rows is not None and self.max_rows < 1:
            raise ValueError("max_rows (--max-running-requests) must be >= 1")
        if self.max_total_tokens is not None and self.max_total_tokens < 16:
            raise ValueError("max_total_tokens must be >= 16")
        if not 0.05 <= self.gpu_memory_fraction <= 0.99:
            raise ValueError("gpu_memory_fraction must be in [0.05, 0.99]")
        if self.cuda_graph_max_prefill_tokens < 0:
            raise ValueError("cuda_graph_max_prefill_tokens must be >= 0 (0: off)")
        if self.cuda_graph_max_mixed_tokens < 0:
            raise ValueError("cuda_graph_max_mixed_tokens must be >= 0 (0: off)")


@dataclass(frozen=True)
class ServerConfig:
    shard: ShardConfig
    scheduler: SchedulerConfig = field(default_factory=SchedulerConfig)
    host: str = "127.0.0.1"
    port: int = 50051
    max_message_bytes: int = 16 * 1024 * 1024
    served_model_name: str | None = None
    # Longest wait for one step's result (the first step and warm-up excepted); past it the
    # shards count as stuck, every call fails and the server exits. None: wait forever.
    step_timeout_s: float | None = 600.0
    # Special-token text in chat message content: "plain" characters or "parse"d as control
    # tokens (see server/tokenizer.py).
    chat_content_special_tokens: str = "plain"
    # JSON constraints: "any" whitespace between elements (at most 32 characters), or
    # "compact" (only the separators ", " and ": "), for models that pad with whitespace.
    json_whitespace: str = "any"
    # Readiness turns NOT_SERVING when requests are pending and no step completed for this
    # long (long before step_timeout kills the server). None: never.
    stall_timeout_s: float | None = 60.0
    # Prometheus /metrics on this port (same host); None: no metrics endpoint.
    metrics_port: int | None = None
    # OTLP/gRPC collector (host:port) for a span per request (the tracing extra); None: off.
    otlp_traces_endpoint: str | None = None
    # A JSON line per completed step written here (docs/operations.md, "Step trace"); None: off.
    step_trace: Path | None = None
    # TLS: certificate chain and key (PEM); with client_ca, clients need a certificate it signed.
    tls_cert: Path | None = None
    tls_key: Path | None = None
    tls_client_ca: Path | None = None
    # Bearer tokens every call but health must carry; empty: no token needed. Never printed.
    auth_tokens: tuple[bytes, ...] = field(default=(), repr=False)
    # SIGTERM: how long live requests may run on before they are ended with FINISH_REASON_ABORT.
    drain_timeout_s: float = 30.0
    # Connection management (docs/operations.md says why each default).
    keepalive_time_s: float = 60.0
    keepalive_timeout_s: float = 20.0
    keepalive_min_client_interval_s: float = 10.0
    max_connection_age_s: float | None = 1800.0  # None: connections live for ever
    max_connection_age_grace_s: float | None = None  # None: calls open at GOAWAY run to their end
    # Shards already running (``lightllm-grpc shard``), in rank order; empty: spawn tp_size here.
    shard_addresses: tuple[str, ...] = ()
    # TLS to those shards (TCP ones): the CA that signed their certificates, and optionally
    # a client certificate and key for shards that ask for one (mutual TLS).
    shard_tls_ca: Path | None = None
    shard_tls_cert: Path | None = None
    shard_tls_key: Path | None = None

    def __post_init__(self) -> None:
        if self.chat_content_special_tokens not in ("plain", "parse"):
            raise ValueError("chat_content_special_tokens must be 'plain' or 'parse'")
        if self.json_whitespace not in ("any", "compact"):
            raise ValueError("json_whitespace must be 'any' or 'compact'")
        for name in ("step_timeout_s", "stall_timeout_s"):
            value = getattr(self, name)
            if value is not None and not value > 0:
                raise ValueError(f"{name} must be > 0, got {value}")
        for name in (
            "drain_timeout_s",
            "keepalive_time_s",
            "keepalive_timeout_s",
            "keepalive_min_client_interval_s",
            "max_connection_age_s",
            "max_connection_age_grace_s",
        ):
            value = getattr(self, name)
            if value is not None and value < 0:
                raise ValueError(f"{name} must be >= 0, got {value}")  # fmt: skip
        check_tls_flags(self.tls_cert, self.tls_key, self.tls_client_ca)
        if self.step_trace is not None and not self.step_trace.parent.is_dir():
            raise ValueError(f"--step-trace {self.step_trace}: no such directory {self.step_trace.parent}")
        if (self.shard_tls_cert is None) != (self.shard_tls_key is None):
            raise ValueError("--shard-tls-cert and --shard-tls-key go together")
        if self.shard_tls_cert is not None and self.shard_tls_ca is None:
            raise ValueError("--shard-tls-cert (a client certificate for shards) needs --shard-tls-ca")
        if self.shard_tls_ca is not None and not self.shard_addresses:
            raise ValueError(
                "--shard-tls-ca is for shards attached with --shards (spawned ones use unix sockets)"
            )
        _check_files(
            {"--shard-tls-ca": self.shard_tls_ca, "--shard-tls-cert": self.shard_tls_cert,
             "--shard-tls-key": self.shard_tls_key}
        )  # fmt: skip
        if not 0 <= self.port < 65536:
            raise ValueError(f"port must be in [0, 65535], got {self.port}")
        if self.shard_addresses and self.shard.tp_size != 1:
            raise ValueError("--shards and --tp-size exclude each other: the listed shards set the TP size")
        rows, most = self.scheduler.max_running_requests, self.shard.max_rows
        if rows is not None and most is not None and rows > most:
            raise ValueError("max_running_requests cannot exceed the shard's req_to_token rows")
