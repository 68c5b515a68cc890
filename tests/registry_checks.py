"""The checks that `test_registry_families_*.py` run on each family of transformers' causal-LM registry (split in two
files so that `pytest -n 2 --dist loadfile` shares them out)."""

import warnings

import pytest
import torch
import transformers
from conftest import assert_logits_close
from registry_families import ACCEPTED, SKIPPED, TOKENS, newer_than_table, probe, random_ids, read_table
from test_fam_core import randomize_fam

import hf_fam
from hf_fam import FamForCausalLM


def check_family(model_type: str, tmp_path) -> None:
    documented = read_table().get(model_type)
    outcome, base, fam = probe(model_type)
    if documented is None:
        # A family the table cannot know (the installed transformers is newer than the table's): held to the rule-7
        # limits if hf-fam accepts it, otherwise refused by probe() with its reason; the table test says to rewrite.
        assert newer_than_table(), f"'{model_type}' is missing from the README's table: run tests/registry_families.py --write-readme"
        warnings.warn(f"'{model_type}' (new in transformers {transformers.__version__}) is {outcome.row()}: rerun tests/registry_families.py --write-readme")
        documented = outcome.row()
    assert outcome.row() == documented, (
        f"'{model_type}': the README says {documented}, the test finds {outcome.row()} ({outcome.detail}); "
        "fix the family or rerun tests/registry_families.py --write-readme"
    )
    if outcome.status == SKIPPED:
        pytest.skip(f"{model_type}: {outcome.reason} ({outcome.detail})")
    if outcome.status == ACCEPTED:
        check_limits(base, fam, tmp_path)
    # refused: probe() caught the UnsupportedArchitectureError, whose reason is the documented one


def check_limits(base, fam, tmp_path) -> None:
    """The spec's rule-7 limits on a tiny accepted family (fam: the converted base with fam_length 0, B 6, M 4)."""
    vocab = base.config.vocab_size
    ids = random_ids(2, TOKENS, vocab=vocab)
    # F = 0 and (M + 1) B >= length: the base model, eager and (where the base supports it) sdpa
    with torch.no_grad():
        assert_logits_close(fam(ids).logits, base(ids).logits, what="BSWA-limit logits (eager)")
    with torch.no_grad():  # and back: the base model class with the same modules
        assert_logits_close(hf_fam.unconvert(fam)(ids).logits, base(ids).logits, rtol=1e-6, what="unconverted logits")
    if type(base)._supports_sdpa:
        base.set_attn_implementation("sdpa")
        try:
            with torch.no_grad():
                assert_logits_close(fam(ids).logits, base(ids).logits, what="BSWA-limit logits (sdpa)")
        finally:
            base.set_attn_implementation("eager")
    # FAM on: streaming chunk by chunk with the cache = one call; causality
    fam = randomize_fam(hf_fam.convert_to_fam(base, block_size=6, memory_segments=1, fam_length=3, verify=False).eval())
    with torch.no_grad():
        whole = fam(ids).logits
        cache, pieces, start = fam.new_cache(), [], 0
        for size in (5, 1, 7, TOKENS - 13):
            pieces.append(fam(ids[:, start : start + size], cache=cache).logits)
            start += size
        assert_logits_close(torch.cat(pieces, 1), whole, what="streamed logits")
        if type(base)._supports_sdpa:  # sdpa with FAM rows: the FAM queries run over their own keys
            fam.set_attn_implementation("sdpa")
            try:
                assert_logits_close(fam(ids).logits, whole, what="FAM logits (sdpa)")
            finally:
                fam.set_attn_implementation("eager")
        changed = ids.clone()
        changed[:, 13] = (changed[:, 13] + 1) % vocab
        after = fam(changed).logits
    assert_logits_close(after[:, :13], whole[:, :13], rtol=1e-6, what="logits before a changed token")
    assert not torch.allclose(after[:, 13], whole[:, 13]), "a token does not affect its own logits"
    # mixture of experts: the router's load-balancing loss, as for mixtral
    if fam._router is not None:
        output = fam(ids, labels=ids, output_router_logits=True)
        assert torch.isfinite(output.aux_loss) and (output.aux_loss > 0) == (len(output.router_logits) > 0)
        plain = fam(ids, labels=ids, output_router_logits=False).loss
        torch.testing.assert_close(output.loss, plain + fam._router.coefficient * output.aux_loss)
    # save and load
    fam.save_pretrained(tmp_path)
    loaded = FamForCausalLM.from_pretrained(tmp_path).eval()
    with torch.no_grad():
        assert_logits_close(loaded(ids).logits, whole, what="logits after save and load")
