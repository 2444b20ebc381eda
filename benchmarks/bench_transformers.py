"""Weight matching on Hugging Face transformer shapes (random init, nothing downloaded).

Prints, per model: groups, the search time for two independent inits, and whether a planted
permutation (heads, within-head dims, MLP units and the residual stream) is recovered exactly.
Needs ``transformers``. ``--quick`` runs the small configurations only.
"""

from __future__ import annotations

import argparse
import time

import torch

from rebasin.matching import match
from rebasin.permutation import invert, permute, random_permutation
from rebasin.spec import infer_spec


def configs(quick: bool) -> dict[str, object]:
    import transformers as t

    out: dict[str, object] = {
        "GPT-2 tiny (4 layers, d=128, 4 heads)": t.GPT2Config(
            n_embd=128, n_layer=4, n_head=4, vocab_size=1000, bos_token_id=0, eos_token_id=0
        ),
        "LLaMA tiny (4 layers, d=128, GQA 8/2)": t.LlamaConfig(
            hidden_size=128, intermediate_size=344, num_hidden_layers=4, num_attention_heads=8,
            num_key_value_heads=2, vocab_size=1000,
        ),
    }  # fmt: skip
    if not quick:
        out["GPT-2 small (12 layers, d=768, 12 heads)"] = t.GPT2Config()
        out["BERT base (12 layers, d=768, 12 heads)"] = t.BertConfig()
    return out


def build(cfg: object, seed: int) -> dict[str, torch.Tensor]:
    import transformers as t

    torch.manual_seed(seed)
    model = t.AutoModelForCausalLM.from_config(cfg) if not isinstance(cfg, t.BertConfig) else t.BertModel(cfg)
    return {k: v.detach() for k, v in model.state_dict().items()}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true")
    args = ap.parse_args()
    print(f"{'model':<42} {'groups':>6} {'A vs B s':>9} {'planted s':>10} {'recovered':>10}")
    for label, cfg in configs(args.quick).items():
        a, b = build(cfg, 0), build(cfg, 1)
        spec = infer_spec(a, config=cfg.to_dict())  # type: ignore[attr-defined]
        t0 = time.perf_counter()
        match(a, b, spec)
        t_ab = time.perf_counter() - t0
        planted = random_permutation(spec, 1)
        pa = dict(permute(a, spec, planted))
        t0 = time.perf_counter()
        found = match(a, pa, spec).perm
        t_pl = time.perf_counter() - t0
        ok = all(torch.equal(found[g], invert(planted)[g]) for g in spec.sizes)
        print(f"{label:<42} {len(spec.sizes):>6} {t_ab:>9.2f} {t_pl:>10.2f} {ok!s:>10}")


if __name__ == "__main__":
    main()
