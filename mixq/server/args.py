"""Launch arguments: SGLang's flags and meanings, read in one place and checked before
any weight is loaded. The config file's `server:`/`inference:` sections are defaults
that explicit flags override."""

from __future__ import annotations

import argparse
import os
import socket
from dataclasses import MISSING, dataclass, field, fields

from mixq.errors import ConfigError

DTYPES = ("auto", "bfloat16", "float16", "float32")
KV_DTYPES = ("auto", "bfloat16", "float16", "float32", "fp8_e4m3", "fp8_e5m2")
ATTENTION_BACKENDS = ("auto", "triton", "torch_native")


@dataclass
class ServerArgs:
    model_path: str | None = None
    mixed_precision_config: str | None = None
    enable_mixed_precision: bool = False
    tokenizer_path: str | None = None
    load_format: str = "auto"
    served_model_name: str | None = None
    tp_size: int = 1
    dp_size: int = 1
    ep_size: int = 1
    enable_ep_moe: bool = False
    dtype: str = "auto"
    kv_cache_dtype: str = "auto"
    device: str = "auto"
    context_length: int | None = None
    max_running_requests: int = 64
    max_total_tokens: int | None = None
    chunked_prefill_size: int = 2048
    mem_fraction_static: float = 0.85
    cpu_kv_cache_space: float = 1.0  # GiB (mixq.engine.engine_config.EngineConfig)
    page_size: int = 16
    host: str = "127.0.0.1"
    port: int = 30000
    api_key: str | None = None
    allow_auto_truncate: bool = False
    max_request_body_mb: float = 16.0
    max_n: int = 16
    max_queued_requests: int | None = None
    trust_remote_code: bool = False
    disable_cuda_graph: bool = False
    disable_radix_cache: bool = False
    disable_overlap_schedule: bool = False
    cuda_graph_max_bs: int | None = None
    cuda_graph_bs: list[int] | None = None
    attention_backend: str = "auto"
    dist_init_addr: str | None = None
    nnodes: int = 1
    node_rank: int = 0
    moe_dispatch: str = "all-reduce"
    log_level: str = "info"
    enable_expert_tracking: bool = False
    expert_stats_dir: str | None = None
    extra: dict = field(default_factory=dict)

    def validate(self, gpu_count: int | None = None) -> None:
        """Raise ConfigError (one line, naming the flag) for impossible settings."""
        for name in ("tp_size", "dp_size", "ep_size", "nnodes", "max_running_requests", "page_size", "port", "max_n"):
            if getattr(self, name) < 1:
                raise ConfigError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(self, name)}")
        if self.max_queued_requests is not None and self.max_queued_requests < 0:
            raise ConfigError(f"--max-queued-requests must be >= 0, got {self.max_queued_requests}")
        if not self.max_request_body_mb > 0:
            raise ConfigError(f"--max-request-body-mb must be > 0, got {self.max_request_body_mb}")
        if self.context_length is not None and self.context_length < 2:
            raise ConfigError(f"--context-length must be >= 2 (a prompt token and an output token), "
                              f"got {self.context_length}")
        if self.device not in ("auto", "cpu", "cuda") and not (
                self.device.startswith("cuda:") and self.device[5:].isdigit()):
            raise ConfigError(f"--device must be auto, cpu, cuda or cuda:N, got {self.device!r}")
        if self.load_format == "dummy" and (self.tp_size > 1 or self.ep_size > 1 or self.nnodes > 1):
            raise ConfigError("--load-format dummy runs in one process per replica: no --tp-size, --ep-size or "
                              "--nnodes above 1")
        if self.load_format == "dummy" and self.model_path is None:
            raise ConfigError("--load-format dummy needs --model-path: a directory with the model's config.json")
        if self.port > 65535:
            raise ConfigError(f"--port must be <= 65535, got {self.port}")
        if not 0 < self.mem_fraction_static < 1:
            raise ConfigError(f"--mem-fraction-static must be in (0, 1), got {self.mem_fraction_static}")
        if not 0 < self.cpu_kv_cache_space < float("inf"):
            raise ConfigError(f"--cpu-kv-cache-space must be > 0 GiB, got {self.cpu_kv_cache_space}")
        if self.dtype not in DTYPES:
            raise ConfigError(f"--dtype must be one of {', '.join(DTYPES)}, got {self.dtype!r}")
        if self.kv_cache_dtype not in KV_DTYPES:
            raise ConfigError(f"--kv-cache-dtype must be one of {', '.join(KV_DTYPES)}, got {self.kv_cache_dtype!r}")
        if self.attention_backend not in ATTENTION_BACKENDS:
            raise ConfigError(f"--attention-backend must be one of {', '.join(ATTENTION_BACKENDS)}, "
                              f"got {self.attention_backend!r}")
        if self.enable_mixed_precision and not self.mixed_precision_config:
            raise ConfigError("--enable-mixed-precision needs --mixed-precision-config")
        if self.mixed_precision_config and not os.path.isfile(self.mixed_precision_config):
            raise ConfigError(f"--mixed-precision-config {self.mixed_precision_config}: no such file")
        if self.model_path is not None and not (os.path.isdir(self.model_path) or (
                os.path.isfile(self.model_path) and self.model_path.endswith(".gguf"))):
            raise ConfigError(f"--model-path {self.model_path}: no such directory or .gguf file")
        if not 0 <= self.node_rank < self.nnodes:
            raise ConfigError(f"--node-rank {self.node_rank} must be in [0, --nnodes {self.nnodes})")
        if self.nnodes > 1 and not self.dist_init_addr:
            raise ConfigError("--nnodes > 1 needs --dist-init-addr HOST:PORT")
        if self.tp_size * self.dp_size % self.nnodes:
            raise ConfigError(f"--tp-size x --dp-size ({self.tp_size * self.dp_size}) must divide by --nnodes {self.nnodes}")
        if self.ep_size > 1 and not self.enable_ep_moe:
            self.enable_ep_moe = True  # SGLang: --ep-size > 1 means EP MoE
        if self.enable_ep_moe and self.ep_size == 1:
            self.ep_size = self.tp_size  # SGLang's --enable-ep-moe: experts split over the whole TP group
        if self.tp_size % self.ep_size:
            raise ConfigError(f"--ep-size {self.ep_size} must divide --tp-size {self.tp_size} (as in SGLang, EP "
                              "partitions the TP ranks; each expert is sharded over tp/ep of them)")
        if self.dp_size > 1 and self.nnodes > 1:
            raise ConfigError("--dp-size > 1 with --nnodes > 1 is not supported: data-parallel replicas run on "
                              "node 0; spread one replica's --tp-size over nodes instead")
        if self.moe_dispatch not in ("all-reduce", "all-to-all"):
            raise ConfigError(f"--moe-dispatch must be all-reduce or all-to-all, got {self.moe_dispatch!r}")
        if self.enable_expert_tracking and self.dp_size > 1:
            raise ConfigError("--enable-expert-tracking with --dp-size > 1 is not supported yet (each replica "
                              "would count its own tokens); use --dp-size 1")
        if self.cuda_graph_max_bs is not None and self.cuda_graph_max_bs < 1:
            raise ConfigError(f"--cuda-graph-max-bs must be >= 1, got {self.cuda_graph_max_bs}")
        if self.cuda_graph_bs is not None and (not self.cuda_graph_bs or min(self.cuda_graph_bs) < 1):
            raise ConfigError(f"--cuda-graph-bs must list batch sizes >= 1, got {self.cuda_graph_bs}")
        if self.chunked_prefill_size == 0 or self.chunked_prefill_size < -1:
            raise ConfigError(f"--chunked-prefill-size must be > 0 or -1 (off), got {self.chunked_prefill_size}")
        if self.expert_stats_dir is not None:
            if not self.enable_expert_tracking:
                raise ConfigError("--expert-stats-dir needs --enable-expert-tracking")
            if not os.path.isdir(self.expert_stats_dir):
                raise ConfigError(f"--expert-stats-dir {self.expert_stats_dir}: no such directory")
        if gpu_count is not None and self.device != "cpu":
            per_node = self.tp_size * self.dp_size // self.nnodes
            if gpu_count == 0:
                need = "" if per_node == 1 else (f"; --tp-size {self.tp_size} x --dp-size {self.dp_size} needs "
                                                 f"{per_node} GPUs per node but 0 are present")
                raise ConfigError(f"--device {self.device}: no CUDA device is available{need} (--device cpu runs "
                                  "on the CPU)")
            if per_node > gpu_count:
                raise ConfigError(
                    f"--tp-size {self.tp_size} x --dp-size {self.dp_size} needs {per_node} GPUs per node "
                    f"but {gpu_count} are present"
                )


# (group, flag, argparse keywords); defaults come from ServerArgs and are shown in --help
_FLAGS: list[tuple[str, str, dict]] = [
    ("model", "--model-path", dict(help="model directory (the base checkpoint) or a GGUF file (default: the embedded SmolLM2-135M "
                                        "mix, prepared into ~/.cache/mixq on first use)")),
    ("model", "--mixed-precision-config", dict(help="mixed-precision YAML (docs/config.md); its inference: and "
                                                    "server: sections are defaults under these flags")),
    ("model", "--enable-mixed-precision", dict(action="store_true", default=None,
                                               help="apply --mixed-precision-config (implied by giving one)")),
    ("model", "--tokenizer-path", dict(help="tokenizer directory (default: the model path)")),
    ("model", "--load-format", dict(choices=("auto", "dummy"), help="auto: read the checkpoints; dummy: random "
                                    "weights in the formats the config maps, from the model path's config.json "
                                    "alone (benchmarks; one process)")),
    ("model", "--served-model-name", dict(help="model name the API reports and accepts (default: the model "
                                               "directory's name)")),
    ("model", "--dtype", dict(help=f"activation and dense weight dtype: {', '.join(DTYPES)} (auto: on CPU bfloat16 "
                                   "where it has native bf16, else float32; on GPU the checkpoint's 16-bit dtype)")),
    ("model", "--kv-cache-dtype", dict(help=f"KV cache dtype: {', '.join(KV_DTYPES)} (auto: --dtype; fp8: one "
                                             "byte a value, per-tensor scales from the checkpoint, else 1.0)")),
    ("model", "--device", dict(help="auto (cuda if available, else cpu), cuda, cuda:N or cpu")),
    ("model", "--trust-remote-code", dict(action="store_true", default=None,
                                          help="accepted for SGLang compatibility (no remote code is run)")),
    ("memory and scheduling", "--context-length", dict(type=int, help="max tokens per sequence, prompt + output "
                                                                      "(default: the model's)")),
    ("memory and scheduling", "--max-running-requests", dict(type=int, help="max sequences decoding at once")),
    ("memory and scheduling", "--max-total-tokens", dict(type=int, help="KV cache capacity in tokens (default: "
                                                                        "from --mem-fraction-static on GPU)")),
    ("memory and scheduling", "--chunked-prefill-size", dict(type=int, help="max prefill tokens per step; -1 "
                                                                            "disables chunking")),
    ("memory and scheduling", "--mem-fraction-static", dict(type=float, help="fraction of GPU memory for weights "
                                                                             "+ KV cache")),
    ("memory and scheduling", "--cpu-kv-cache-space", dict(type=float, metavar="GIB", help="on a CPU: KV cache budget "
                                                                 "in GiB (like vLLM's VLLM_CPU_KVCACHE_SPACE); the "
                                                                 "cache is the smaller of this and what "
                                                                 "--max-running-requests full-length sequences "
                                                                 "need. --max-total-tokens overrides")),
    ("memory and scheduling", "--page-size", dict(type=int, help="tokens per KV cache block")),
    ("memory and scheduling", "--attention-backend", dict(help="triton (paged attention kernels; auto on CUDA) or "
                                                               "torch_native (SDPA per sequence; auto on CPU)")),
    ("memory and scheduling", "--disable-cuda-graph", dict(action="store_true", default=None,
                                                           help="run decode steps eagerly, no CUDA graphs")),
    ("memory and scheduling", "--disable-radix-cache", dict(action="store_true", default=None,
                                                             help="turn prefix caching off (on by default: requests "
                                                                  "reuse the KV blocks of a shared prompt prefix)")),
    ("memory and scheduling", "--disable-overlap-schedule", dict(
        action="store_true", default=None, help="record each step before scheduling the next (on by default: the "
                                                "host schedules step i+1 and records step i while the device runs)")),
    ("memory and scheduling", "--cuda-graph-max-bs", dict(type=int, help="largest decode batch replayed from a CUDA "
                                                                         "graph (default: --max-running-requests, "
                                                                         "at most 256)")),
    ("memory and scheduling", "--cuda-graph-bs", dict(type=int, nargs="+", help="the decode batch sizes to capture "
                                                                                "(default: 1 2 4 8 and multiples "
                                                                                "of 8 up to --cuda-graph-max-bs)")),
    ("HTTP server", "--host", dict(help="bind address")),
    ("HTTP server", "--port", dict(type=int, help="port (checked free before the model loads)")),
    ("HTTP server", "--api-key", dict(help="require 'Authorization: Bearer KEY' on every route but /health and "
                                           "/metrics, which stay open for probes and Prometheus (as in SGLang)")),
    ("HTTP server", "--log-level", dict(help="debug, info, warning, error")),
    ("request limits", "--allow-auto-truncate", dict(action="store_true", default=None,
                                                     help="keep the last context-length - 1 tokens of an over-long "
                                                          "prompt instead of refusing it")),
    ("request limits", "--max-request-body-mb", dict(type=float, help="largest request body in MiB (413 above)")),
    ("request limits", "--max-n", dict(type=int, help="largest n (completions per request)")),
    ("request limits", "--max-queued-requests", dict(type=int, help="requests that may wait beyond "
                                                                    "--max-running-requests (503 'The request "
                                                                    "queue is full.' above) (default: no limit)")),
    ("parallelism", "--tp-size", dict(type=int, help="tensor parallel size")),
    ("parallelism", "--dp-size", dict(type=int, help="data parallel replicas")),
    ("parallelism", "--ep-size", dict(type=int, help="expert parallel size (divides --tp-size)")),
    ("parallelism", "--enable-ep-moe", dict(action="store_true", default=None,
                                            help="expert parallelism for MoE layers (--ep-size = --tp-size)")),
    ("parallelism", "--moe-dispatch", dict(help="EP token dispatch: all-reduce (tokens stay, partial outputs are "
                                                "summed) or all-to-all (tokens travel to their experts' ranks; "
                                                "needs ep = tp)")),
    ("parallelism", "--dist-init-addr", dict(help="HOST:PORT of node 0 for multi-node")),
    ("parallelism", "--nnodes", dict(type=int, help="number of nodes")),
    ("parallelism", "--node-rank", dict(type=int, help="this node's rank")),
    ("expert tracking", "--enable-expert-tracking", dict(action="store_true", default=None,
                                                         help="count MoE expert activations")),
    ("expert tracking", "--expert-stats-dir", dict(help="directory /expert_stats/export and "
                                                        "/dump_expert_distribution_record may write to (nothing "
                                                        "outside it)")),
]


def add_server_flags(p: argparse.ArgumentParser) -> None:
    """Every launch flag, in groups, all defaulting to None so config-file defaults can
    apply; each help ends with ServerArgs' default."""
    defaults = {f.name: f.default for f in fields(ServerArgs) if f.default is not MISSING}
    groups: dict[str, argparse._ArgumentGroup] = {}
    for group, flag, kw in _FLAGS:
        g = groups.get(group) or groups.setdefault(group, p.add_argument_group(group))
        default = defaults.get(flag[2:].replace("-", "_"))
        if default is not None and default is not False and "default" not in kw.get("help", ""):
            kw = {**kw, "help": f"{kw.get('help', '')} (default: {default})"}
        g.add_argument(flag, **kw)


def gpu_count(device: str) -> int | None:
    """CUDA devices torch sees, for checking flags; None where the device may be the CPU."""
    if device == "cpu":
        return None
    import torch

    return torch.cuda.device_count() if torch.cuda.is_available() else (0 if device != "auto" else None)


def check_port_free(host: str, port: int) -> None:
    """ConfigError if nothing can listen on host:port now, bound the way uvicorn binds
    (IPv6 for a host with a colon, else IPv4; SO_REUSEADDR), so a port in use is refused
    before the model loads."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((host, port))
        except socket.gaierror as e:
            raise ConfigError(f"--host {host}: cannot resolve it ({e.strerror})") from None
        except OSError as e:
            raise ConfigError(f"--port {port}: cannot listen on {host}:{port}: {e.strerror}") from None


def from_namespace(ns: argparse.Namespace) -> ServerArgs:
    """ServerArgs from parsed flags, with the config's server/inference sections as
    defaults under explicit flags. Raises ConfigError."""
    explicit = {f.name: getattr(ns, f.name) for f in fields(ServerArgs) if getattr(ns, f.name, None) is not None}
    defaults: dict = {}
    cfg_path = explicit.get("mixed_precision_config")
    # dummy weights read no checkpoint: the config's paths need not exist (its mapping is used)
    if cfg_path and os.path.isfile(cfg_path) and explicit.get("load_format") != "dummy":
        from mixq.config.schema import MixedPrecisionConfig

        cfg = MixedPrecisionConfig.from_yaml(cfg_path, model_path=explicit.get("model_path"))
        if cfg.server.host is not None:
            defaults["host"] = cfg.server.host
        if cfg.server.port is not None:
            defaults["port"] = cfg.server.port
        if cfg.inference.max_seq_length is not None:
            defaults["context_length"] = cfg.inference.max_seq_length
        if cfg.inference.max_batch_size is not None:
            defaults["max_running_requests"] = cfg.inference.max_batch_size
        if cfg.inference.dtype != "auto":
            defaults["dtype"] = cfg.inference.dtype
        defaults["enable_mixed_precision"] = True  # a config given is a config applied
    return ServerArgs(**{**defaults, **explicit})


def check_generate_args(ns: argparse.Namespace):
    """`mixq generate`'s flags, checked by the rules `serve` and the API use, before anything
    is prepared or loaded. Returns the SamplingParams they give; ConfigError names a flag."""
    from mixq.distributed.config import ParallelConfig
    from mixq.engine.sampling_params import SamplingParamError, SamplingParams

    args = ServerArgs(model_path=ns.model_path, mixed_precision_config=ns.mixed_precision_config, device=ns.device,
                      dtype=ns.dtype, tp_size=ns.tp_size, ep_size=ns.ep_size,
                      enable_expert_tracking=ns.enable_expert_tracking or ns.expert_stats_out is not None)
    args.validate(gpu_count(ns.device))
    ParallelConfig(args.tp_size, args.ep_size)
    if ns.expert_stats_out is not None:
        parent = os.path.dirname(os.path.abspath(ns.expert_stats_out))
        if not os.path.isdir(parent):
            raise ConfigError(f"--expert-stats-out {ns.expert_stats_out}: directory {parent} does not exist")
    try:
        return SamplingParams(max_new_tokens=ns.max_new_tokens, temperature=ns.temperature, top_p=ns.top_p,
                              seed=ns.seed)
    except SamplingParamError as e:  # "top_p must be ..." -> "--top-p must be ..."
        raise ConfigError("--" + e.param.replace("_", "-") + str(e)[len(e.param):]) from None
