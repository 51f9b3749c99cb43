#!/usr/bin/env bash
# The GPU machine's part of issue 15, after `assemble.sh` has rebuilt the bundle in /tmp/gpu:
#   bash benchmarks/gpu_session.sh setup      models into place, versions, GPU tests, kvfuse run,
#                                             kvfuse's benchmark rows
#   bash benchmarks/gpu_session.sh bench SYSTEMS OUT.json    benchmarks/bench_gpu.py for SYSTEMS
#   bash benchmarks/gpu_session.sh serve      the GPU tests, then `kvfuse serve --device cuda`
#                                             answering one OpenAI chat request over HTTP
# The bundle (made on a CPU machine, see README "Target cuda"): model.onnx of
# `kvfuse optimize smollm2 … --target cuda`, model.safetensors (SmolLM2 in float16, the same
# weights as a Hugging Face dir), wheels; /tmp/bundle/small holds the small files beside them
# (kv/: the model's kvfuse.json + tokenizer, hf/: config + tokenizer, reference.npz: the float32
# CPU trace of `python -m tests.runtime.cuda_trace`).
set -uo pipefail
export PYTHONPATH=/tmp/site:$PWD HF_HUB_OFFLINE=1
out=${OUT:-/tmp/out}; mkdir -p "$out"
small=/tmp/bundle/small
if [ "$1" = serve ]; then
  mkdir -p /tmp/kv && cp "$small"/kv/* /tmp/kv/ && ln -sf /tmp/gpu/model.onnx /tmp/kv/model.onnx
  KVFUSE_CUDA_MODEL=/tmp/kv KVFUSE_CUDA_REFERENCE=$small/reference.npz \
    python3 -m pytest tests/runtime/test_cuda_runtime.py -v -s -p no:cacheprovider 2>&1 | tee "$out/gpu_tests.txt"
  python3 -m kvfuse serve /tmp/kv --device cuda --port 8099 > "$out/serve.log" 2>&1 &
  server=$!
  for _ in $(seq 90); do curl -sf localhost:8099/health > /dev/null && break; sleep 1; done
  curl -s localhost:8099/v1/chat/completions -H 'content-type: application/json' \
    -d '{"model":"kv","messages":[{"role":"user","content":"What is the capital of France?"}],"max_tokens":16,"temperature":0}' \
    | tee "$out/serve_chat.json"; echo
  kill "$server"; wait "$server" 2>/dev/null
  exit 0
fi
if [ "$1" = setup ]; then
  mkdir -p /tmp/kv /tmp/hf
  cp "$small"/kv/* /tmp/kv/ && ln -sf /tmp/gpu/model.onnx /tmp/kv/model.onnx
  cp "$small"/hf/* /tmp/hf/ && ln -sf /tmp/gpu/model.safetensors /tmp/hf/model.safetensors
  { nvidia-smi; python3 -c "import onnxruntime as o, torch, transformers; print('onnxruntime', o.__version__, o.get_available_providers()); print('torch', torch.__version__, 'transformers', transformers.__version__)"; } 2>&1 | tee "$out/environment.txt"
  python3 - > "$out/placement.txt" 2>&1 <<'PY'
import onnxruntime as ort  # which provider each node is placed on (CUDA graphs need no copies)
options = ort.SessionOptions(); options.log_severity_level = 0
ort.InferenceSession("/tmp/kv/model.onnx", options, providers=["CUDAExecutionProvider"])
PY
  grep -iE "placed on|memcpy|cannot use" "$out/placement.txt" | head -20
  which nsys ncu 2>&1 | tee -a "$out/environment.txt"
  KVFUSE_CUDA_MODEL=/tmp/kv KVFUSE_CUDA_REFERENCE=$small/reference.npz \
    python3 -m pytest tests/runtime/test_cuda_runtime.py -v -s -p no:cacheprovider 2>&1 | tee "$out/gpu_tests.txt"
  python3 -m kvfuse run /tmp/kv --device cuda --prompt "What is the capital of France?" 2>&1 | tee "$out/kvfuse_run.txt"
  ORT_ENABLE_ATTENTION_KERNEL_DEBUG_INFO=1 python3 -m kvfuse run /tmp/kv --device cuda \
    --max-new-tokens 3 --prompt "Hi" 2>&1 | grep -oE "SdpaKernel=[A-Z_]+|AttentionKernelOptions.*" \
    | sort | uniq -c | tee "$out/attention_kernels.txt"
  python3 benchmarks/bench_gpu.py --kvfuse /tmp/kv --hf /tmp/hf --work /tmp/work \
    --systems "${KVFUSE_SYSTEMS:-kvfuse-graph,kvfuse-eager}" --out "$out/bench_kvfuse.json" \
    2>&1 | tee "$out/bench_kvfuse.txt"
else
  python3 benchmarks/bench_gpu.py --kvfuse /tmp/kv --hf /tmp/hf --work /tmp/work \
    --systems "$2" --out "$out/$3" 2>&1 | tee "$out/${3%.json}.txt"
fi
