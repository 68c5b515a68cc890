"""Half of transformers' causal-LM families (the other half: test_registry_families_b.py): each as the README's table says."""

import warnings

import pytest
from registry_checks import check_family
from registry_families import families


@pytest.mark.parametrize("model_type", families()[0::2])
def test_family_is_as_documented(model_type, tmp_path):
    check_family(model_type, tmp_path)


def test_readme_table_lists_every_registry_family_and_meets_the_target():
    import transformers
    from registry_families import counts, newer_than_table, read_table, table_version, target_ratio

    rows = read_table()
    if sorted(rows) != families() and newer_than_table():
        # Each family the table does not list is still checked (test_family_is_as_documented); only the table is old.
        new, gone = sorted(set(families()) - set(rows)), sorted(set(rows) - set(families()))
        warnings.warn(
            f"transformers {transformers.__version__} is newer than the README's table ({table_version()}): new "
            f"families {new}, gone {gone}; run tests/registry_families.py --write-readme"
        )
    else:
        assert sorted(rows) == families(), "the README's table of families is stale: run tests/registry_families.py --write-readme"
    accepted, candidates = target_ratio(rows)
    print(f"\n{len(rows)} causal-LM families: " + ", ".join(f"{n} {what}" for what, n in counts(rows).items()))
    print(f"accepted {accepted} of {candidates} attention-only rotary decoder families that could be tried")
    assert accepted >= 0.9 * candidates
