"""Text of the systemd units and the commented default configs (`fogline install-service`).

The files under systemd/ in the repository are these templates rendered with the
defaults (`python -m fogline.service_install --sync-repo` rewrites them;
tests/test_systemd.py fails when they drift). They live in the package, not as
data files, so an installed wheel can write them.

Placeholders: @CONFIG_DIR@ (default /etc/fogline), @PATH@ (the unit's PATH, the
fogline virtualenv's bin/ first), @VERSION@.
"""

from __future__ import annotations

# First line of every unit fogline writes: install-service replaces a unit that starts
# with it, and refuses (without --force) to replace one an administrator wrote.
MARKER = "# Written by `fogline install-service`"

DEFAULT_PATH = "/opt/fogline/bin:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin"

# Shared by both units. Reasoning for the choices that are not obvious:
#
# * DynamicUser=yes + User=fogline: no account to manage; both units name the same
#   user, so when edge and cloud run on one host (the demo) they get the same
#   dynamic UID and share /var/lib/fogline instead of fighting over its owner.
# * ProcSubset= stays "all": the device monitor reads /proc/loadavg, /proc/meminfo
#   and /proc/pressure/memory, which ProcSubset=pid would hide (torch reads
#   /proc/cpuinfo and /proc/meminfo too).
# * PrivateDevices=/DeviceAllow= differ: the edge (CPU llama.cpp) needs no device
#   node; the cloud may drive an NVIDIA GPU (see its unit).
# * SystemCallFilter keeps @resources: llama.cpp/OpenMP/torch set thread affinity
#   and memory policy (sched_setaffinity, set_mempolicy/mbind).
# * RestrictAddressFamilies: AF_INET/AF_INET6 to serve and reach the cloud, AF_UNIX
#   for $NOTIFY_SOCKET and the journal; no AF_NETLINK (glibc falls back cleanly).
# * Secrets (API keys, the cloud token) go in the 0600 EnvironmentFile, which PID 1
#   reads as root; the TOML stays world-readable and secret-free.
_HARDENING = """\
# --- sandbox (systemd-analyze security: about 1.4 "OK") ---
DynamicUser=yes
User=fogline
ProtectSystem=strict
ProtectHome=yes
PrivateTmp=yes
PrivateUsers=yes
PrivateIPC=yes
PrivateMounts=yes
NoNewPrivileges=yes
CapabilityBoundingSet=
AmbientCapabilities=
ProtectKernelTunables=yes
ProtectKernelModules=yes
ProtectKernelLogs=yes
ProtectControlGroups=yes
ProtectClock=yes
ProtectHostname=yes
ProtectProc=invisible
# not "pid": the device monitor needs /proc/loadavg, /proc/meminfo, /proc/pressure
ProcSubset=all
RestrictNamespaces=yes
RestrictRealtime=yes
RestrictSUIDSGID=yes
RemoveIPC=yes
LockPersonality=yes
RestrictAddressFamilies=AF_INET AF_INET6 AF_UNIX
SystemCallArchitectures=native
SystemCallFilter=@system-service
SystemCallFilter=~@privileged
SystemCallErrorNumber=EPERM
UMask=0077
KeyringMode=private
"""

EDGE_UNIT = MARKER + """ (fogline @VERSION@).
# Replaced on upgrade: do not edit. Local changes go in drop-ins,
#   /etc/systemd/system/fogline-edge.service.d/*.conf   (systemctl edit fogline-edge)
# settings in @CONFIG_DIR@/edge.toml, secrets in @CONFIG_DIR@/edge.env (mode 0600);
# neither is ever overwritten. Board notes (Jetson drop-in, memory): docs/boards.md.

[Unit]
Description=fogline edge runtime (llama.cpp shallow layers, OpenAI-compatible API)
Documentation=man:systemd.exec(5)
After=network-online.target
Wants=network-online.target
StartLimitIntervalSec=10min
StartLimitBurst=5

[Service]
# READY=1 once the model is loaded; WATCHDOG=1 every WatchdogSec/2 while healthy.
# `env` execs fogline in place, so the main PID is the daemon (NotifyAccess=main).
Type=notify
NotifyAccess=main
ExecStart=/usr/bin/env fogline edge serve --config @CONFIG_DIR@/edge.toml
EnvironmentFile=-@CONFIG_DIR@/edge.env
Environment=PATH=@PATH@
Environment=PYTHONUNBUFFERED=1
Restart=on-failure
RestartSec=5s
# exit code 2 is a configuration or bundle error: restarting cannot fix it
RestartPreventExitStatus=2
# loading (and hashing) a GGUF from an SD card can take minutes
TimeoutStartSec=10min
TimeoutStopSec=30s
WatchdogSec=30s

# Bundles live in /var/lib/fogline (fogline export --out /var/lib/fogline/bundle).
StateDirectory=fogline
StateDirectoryMode=0750
CacheDirectory=fogline
CacheDirectoryMode=0750
ConfigurationDirectory=fogline

# --- memory: percentages of the board's RAM, so one unit fits every board ---
# The export budget (quantize/budget.py) gives the edge half of the RAM; past
# MemoryHigh the kernel reclaims from this service first, past MemoryMax it is
# OOM-killed alone (and restarted) instead of taking the board down.
MemoryHigh=50%
MemoryMax=70%
# llama.cpp may mlock the weights so they are never paged out to the SD card;
# locked pages still count against MemoryMax.
LimitMEMLOCK=infinity
# If the whole board runs out of memory, lose (and restart) the edge before sshd.
OOMScoreAdjust=500

# The edge needs no device node (CPU llama.cpp). A Jetson CUDA build does: see
# docs/boards.md for the drop-in (PrivateDevices=no, DeviceAllow=, and
# MemoryDenyWriteExecute=no for the CUDA driver's PTX JIT).
PrivateDevices=yes
DevicePolicy=closed
# llama.cpp's CPU kernels are compiled ahead of time (no JIT), and Python's ctypes
# callbacks (the hidden-state eval callback) use libffi trampolines that need no
# writable+executable memory: tests/test_systemd.py runs llama.cpp under the
# kernel's equivalent (PR_SET_MDWE) to prove it.
MemoryDenyWriteExecute=yes
""" + _HARDENING + """
[Install]
WantedBy=multi-user.target
"""

CLOUD_UNIT = MARKER + """ (fogline @VERSION@).
# Replaced on upgrade: do not edit. Local changes go in drop-ins,
#   /etc/systemd/system/fogline-cloud.service.d/*.conf   (systemctl edit fogline-cloud)
# settings in @CONFIG_DIR@/cloud.toml, secrets in @CONFIG_DIR@/cloud.env (mode 0600);
# neither is ever overwritten.

[Unit]
Description=fogline cloud runtime (PyTorch deep layers, websocket sessions)
Documentation=man:systemd.exec(5)
After=network-online.target
Wants=network-online.target
StartLimitIntervalSec=10min
StartLimitBurst=5

[Service]
Type=notify
NotifyAccess=main
ExecStart=/usr/bin/env fogline cloud serve --config @CONFIG_DIR@/cloud.toml
EnvironmentFile=-@CONFIG_DIR@/cloud.env
Environment=PATH=@PATH@
Environment=PYTHONUNBUFFERED=1
# torch, Triton and Hugging Face write caches under $HOME, which a dynamic user lacks
Environment=XDG_CACHE_HOME=%C/fogline
Environment=HF_HOME=%C/fogline/huggingface
Environment=TORCHINDUCTOR_CACHE_DIR=%C/fogline/inductor
Environment=TRITON_CACHE_DIR=%C/fogline/triton
Environment=CUDA_CACHE_PATH=%C/fogline/nv
Restart=on-failure
RestartSec=5s
RestartPreventExitStatus=2
# importing torch and moving the deep layers to the GPU
TimeoutStartSec=10min
TimeoutStopSec=60s
WatchdogSec=60s

StateDirectory=fogline
StateDirectoryMode=0750
CacheDirectory=fogline
CacheDirectoryMode=0750
ConfigurationDirectory=fogline

# --- memory: the cloud host usually runs little else; the KV budget is in cloud.toml ---
MemoryHigh=80%
MemoryMax=90%
LimitMEMLOCK=infinity
OOMScoreAdjust=200

# NVIDIA GPUs: /dev/nvidia0..N and /dev/nvidiactl (major "nvidia-frontend"),
# /dev/nvidia-uvm, and the MIG capability nodes. Nothing else; on a host without
# the driver these lines match no device and the cloud runs on the CPU.
PrivateDevices=no
DevicePolicy=closed
DeviceAllow=char-nvidia-frontend rw
DeviceAllow=char-nvidia-uvm rw
DeviceAllow=char-nvidia-caps r
# Not MemoryDenyWriteExecute=yes: PyTorch's CPU kernels come from oneDNN's JIT
# (bf16 matmuls, convolutions) and the CUDA driver JIT-compiles PTX; both need
# writable+executable memory (tests/test_systemd.py shows torch failing under
# PR_SET_MDWE).
MemoryDenyWriteExecute=no
""" + _HARDENING + """
[Install]
WantedBy=multi-user.target
"""

EDGE_CONFIG = """\
# fogline edge daemon configuration — read by `fogline edge serve --config` (fogline @VERSION@).
#
# Written once by `fogline install-service --role edge`; upgrades never overwrite it.
# Precedence, lowest first: built-in defaults < this file < FOGLINE_EDGE_<KEY>
# environment variables (e.g. in @CONFIG_DIR@/edge.env) < command-line flags.
# Every line below shows the default; uncomment to change it. The effective
# configuration is logged at startup (journalctl -u fogline-edge).
#
# Keys may also sit under an [edge] table.

# The edge half of an export: `fogline export --out /var/lib/fogline/bundle ...`
# writes bundle/edge and bundle/cloud. /var/lib/fogline is the unit's StateDirectory.
bundle = "/var/lib/fogline/bundle/edge"

# Where the OpenAI-compatible API listens. 127.0.0.1 serves this board only;
# 0.0.0.0 serves the network (then set an API key, below).
#host = "127.0.0.1"
#port = 8080

# llama.cpp compute threads; 0 = the number of physical cores.
# On a Raspberry Pi leave one core for the HTTP server if it also runs other work.
#threads = 0

# Sequences decoded together (KV slots) and tokens per request (prompt + completion).
# Memory grows with parallel x ctx_size; the export's memory estimate assumes these defaults.
#parallel = 4
#ctx_size = 2048
#batch_size = 512

# Requests that may wait for a free sequence before the API answers 429 + Retry-After.
#queue_size = 32
#retry_after_s = 1

# Require `Authorization: Bearer <key>` on /v1/* and /api/*. Do not write it here (this file is
# world-readable): put FOGLINE_EDGE_API_KEY=... in @CONFIG_DIR@/edge.env (mode 0600).
#api_key = ""

# Model id for /v1/models and /api/tags; empty means "fogline-edge-k<K>".
#model_name = ""
# Refuse requests that name another model (default: any name means the one served).
#strict_model_name = false

# Mode for requests that name none: edge | collab | spec | cloud | auto.
#default_mode = "edge"

# Keep h_K of every position for a later upload to the cloud (collab/spec need it).
#capture_hidden = false

# Re-hash the bundle against its manifest at startup (slow for big GGUFs on SD cards).
#verify_bundle = true

#max_body_bytes = 4194304
#log_level = "info"

# --- the cloud link (collab, spec and cloud modes); empty cloud_url: edge only ---
# The cloud's websocket, e.g. "ws://cloud.example:8700/ws" (a URL with no path means /ws).
#cloud_url = ""
# The cloud's bearer token: put FOGLINE_EDGE_CLOUD_TOKEN=... in @CONFIG_DIR@/edge.env, not here.
#cloud_token = ""
# Hidden states on the wire: fp16 | int8 (blockwise absmax, half the bytes) | fp32.
#cloud_codec = "fp16"
# A cloud answer slower than this (ms) finishes the request in edge mode (0: no deadline).
#cloud_deadline_ms = 5000
# h_K rows kept per request to replay to a cloud that lost the session.
#replay_history_tokens = 4096
# collab: emit at the edge when the exit's confidence >= tau (when neither the request
# nor the bundle's calibration gives one), else ask the cloud.
#tau = 0.9
# spec: initial draft block length.
#spec_gamma = 4
# spec: draft only while the exit's confidence >= this (0: always; higher: fewer cloud rows per
# token, fewer tokens per round trip).
#spec_stop = 0.5
# greedy decoding mixes the exit head with a copy of the context (prompt lookup; weights from
# the bundle's calibration). false: the exit head alone.
#prompt_lookup = true
# collab: share of the edge's own tokens the cloud checks against the full model (the live
# agreement the auto policy learns from; one extra head row each on the cloud).
#collab_check_share = 0.25
# Seconds between RTT pings on the cloud link.
#cloud_ping_s = 2.0

# --- the auto policy and the device monitor ---
# auto: the per-token latency target (ms/token) a request gets unless it says
# otherwise (its `fogline_slo_ms` field), and the least expected agreement with the full model.
#slo_ms = 100.0
#min_quality = 0.9
#policy_seed = 0
# Seconds between device samples (temperature, memory, load, power); a board at or above
# hot_c degrees C, or throttling, is hot.
#device_sample_s = 5.0
#hot_c = 75.0
"""

EDGE_ENV = """\
# Secrets for fogline-edge.service (fogline @VERSION@). Mode 0600, read by systemd as
# root and passed to the daemon as environment variables; never overwritten.
#FOGLINE_EDGE_API_KEY=
#FOGLINE_EDGE_CLOUD_TOKEN=
"""

CLOUD_CONFIG = """\
# fogline cloud daemon configuration — read by `fogline cloud serve --config` (fogline @VERSION@).
#
# Written once by `fogline install-service --role cloud`; upgrades never overwrite it.
# Precedence, lowest first: built-in defaults < this file < FOGLINE_CLOUD_<KEY>
# environment variables (e.g. in @CONFIG_DIR@/cloud.env) < command-line flags.
# Every line below shows the default; uncomment to change it. Keys may also sit
# under a [cloud] table.

# The cloud half of an export (bundle/cloud). Its manifest must match the edges'
# (same model fingerprint and split K) or they refuse to pair.
bundle = "/var/lib/fogline/bundle/cloud"

# Where the websocket server listens. Edges on other machines need 0.0.0.0 (and a
# token, below); the link is plain TCP: put it behind TLS or a VPN (WireGuard).
#host = "127.0.0.1"
#port = 8700

# torch device and dtype of the deep layers and their KV cache:
# "cpu" or "cuda[:n]"; "float32" | "bfloat16" | "float16".
#device = "cpu"
#dtype = "float32"
# torch intra-op threads; 0 = torch's default (all cores).
#threads = 0
# CPU: a lone session's decode steps (one row) through an inductor-compiled matmul that
# streams the weights faster than MKL/oneDNN (batches stay on oneDNN). Needs a C++
# compiler; the first start compiles for ~15 s, later ones read the inductor cache (~3 s).
# Measured: 0.58-0.69x eager's deep-layer step time for one session (tools/bench_cloud.py).
#fast_gemv = false

# Edges must present this token in the handshake. Do not write it here (this file
# is world-readable): put FOGLINE_CLOUD_TOKEN=... in @CONFIG_DIR@/cloud.env (mode 0600).
#token = ""

# Bytes of KV cache all sessions may hold together; least recently used sessions
# are evicted beyond it (an edge that comes back replays its history).
#kv_budget_bytes = 2147483648

# Sessions idle this long are dropped.
#session_ttl_s = 900.0

# How long the batcher waits after a step arrives to gather other sessions' steps
# into the same forward pass.
#batch_window_ms = 2.0

# Steps waiting for the model; beyond it requests get a typed `overloaded` error
# (the edge treats that like a slow cloud).
#max_queue = 1024

#log_level = "INFO"
"""

CLOUD_ENV = """\
# Secrets for fogline-cloud.service (fogline @VERSION@). Mode 0600, read by systemd as
# root and passed to the daemon as environment variables; never overwritten.
#FOGLINE_CLOUD_TOKEN=
"""
