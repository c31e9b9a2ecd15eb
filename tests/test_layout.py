"""The house: layer_rope.py is the method a user copies (stdlib, numpy and torch at module level; works
copied alone), harness.py above it, the experiments, then baselines on top, and no import arrow back."""

import ast
import glob
import os
import shutil
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
LOCAL = {os.path.basename(p)[:-3] for p in glob.glob(os.path.join(ROOT, "*.py"))}
# baselines.py sits on the KV experiment: attention sorting and calibration reorder and read its records
LEVEL = {"layer_rope": 0, "reference_numpy": 0, "harness": 1, "kv_retrieval": 2, "extrapolation": 2, "baselines": 3}


def imports(module: str, top_level_only: bool = False) -> set:
    """Modules `module`.py imports: every import statement, or only those at module level."""
    tree = ast.parse(open(os.path.join(ROOT, module + ".py")).read())
    nodes = tree.body if top_level_only else ast.walk(tree)
    out = set()
    for node in nodes:
        if isinstance(node, ast.Import):
            out |= {a.name.split(".")[0] for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.level == 0:
            out.add(node.module.split(".")[0])
    return out


def test_every_top_level_file_has_a_level():
    assert LOCAL == set(LEVEL), f"a new top-level file needs a place in the house: {sorted(LOCAL ^ set(LEVEL))}"


def test_imports_only_point_down():
    """No cycle, no import from the method up, none between the experiments and baselines."""
    for module in LOCAL:
        for dep in imports(module) & LOCAL:
            assert LEVEL[dep] < LEVEL[module], f"{module} imports {dep}: arrows point down only"


def test_the_method_imports_stdlib_numpy_torch_at_module_level():
    third_party = imports("layer_rope", top_level_only=True) - set(sys.stdlib_module_names) - {"__future__"}
    assert third_party == {"numpy", "torch"}, third_party


COPIED_ALONE = """
import sys
import layer_rope as lr
assert "transformers" not in sys.modules and "harness" not in sys.modules, "imported more than it needs"
import torch
from transformers import LlamaConfig, LlamaForCausalLM

def tiny(**rope):
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=101, hidden_size=64, intermediate_size=128, num_hidden_layers=4,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                      initializer_range=0.2, **rope)
    return LlamaForCausalLM(cfg).eval()

ids = torch.randint(0, 101, (2, 48), generator=torch.Generator().manual_seed(1))
s = 2.5
model, linear = tiny(), tiny(rope_parameters={"rope_type": "linear", "factor": s, "rope_theta": 10000.0})
with torch.no_grad():
    plain = model(ids).logits
    with lr.scaled(model, [s] * lr.num_layers(model)):
        ours = model(ids).logits
    theirs = linear(ids).logits
assert torch.equal(ours, theirs), "uniform factor != transformers' linear rope type bit for bit"
assert not torch.equal(plain, ours), "the factor changed nothing"
cfg = lr.GAConfig(num_layers=12, population=6, generations=3, seed=0)
res = lr.genetic_search(lr.synthetic_fitness, cfg, progress=False)
assert len(res.factors) == 12 and res.fitness == max(e[1] for e in res.evaluations)
assert res.fitness > min(e[1] for e in res.evaluations), "the GA found nothing better than its worst"
print("OK", res.fitness)
"""


def test_layer_rope_works_copied_alone_into_an_empty_folder(tmp_path):
    shutil.copy(os.path.join(ROOT, "layer_rope.py"), tmp_path)
    (tmp_path / "use_it.py").write_text(COPIED_ALONE)
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    p = subprocess.run([sys.executable, "use_it.py"], cwd=tmp_path, env=env, capture_output=True, text=True,
                       timeout=600)
    assert p.returncode == 0 and "OK" in p.stdout, p.stderr[-3000:]
    assert sorted(os.listdir(tmp_path)) in (["layer_rope.py", "use_it.py"],
                                           ["__pycache__", "layer_rope.py", "use_it.py"])
