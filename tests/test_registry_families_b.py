"""Half of transformers' causal-LM families (the other half: test_registry_families_a.py): each as the README's table says."""

import pytest
from registry_checks import check_family
from registry_families import families


@pytest.mark.parametrize("model_type", families()[1::2])
def test_family_is_as_documented(model_type, tmp_path):
    check_family(model_type, tmp_path)
