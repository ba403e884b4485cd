"""The chart's CRD is crds/quantizedmodel.yaml, upgraded by `helm upgrade`, kept by `helm uninstall`."""

from __future__ import annotations

from chart_tests.chart_support import CHART, CRD_FILE, find, load_crd_file, one, render


def test_chart_copy_is_byte_identical_to_crds():
    copy = CHART / "files" / "quantizedmodel.yaml"
    assert copy.read_bytes() == CRD_FILE.read_bytes(), (
        "charts/qmodel/files/quantizedmodel.yaml differs from crds/quantizedmodel.yaml (the source of "
        "truth): make crd-sync"
    )


def test_rendered_crd_equals_the_source_of_truth():
    """fromYaml/toYaml must not change a value (numbers, quoting) on the way through the template."""
    crd = one(render(), "CustomResourceDefinition")
    source = load_crd_file()
    assert crd["spec"] == source["spec"]
    assert crd["metadata"]["name"] == source["metadata"]["name"]
    assert source["metadata"]["labels"].items() <= crd["metadata"]["labels"].items()
    assert crd["metadata"]["labels"]["app.kubernetes.io/managed-by"] == "Helm"


def test_kept_on_uninstall_unless_asked_and_optional():
    crd = one(render(), "CustomResourceDefinition")
    assert crd["metadata"]["annotations"] == {"helm.sh/resource-policy": "keep"}
    loose = one(render({"crds.keep": False}), "CustomResourceDefinition")
    assert "helm.sh/resource-policy" not in (loose["metadata"].get("annotations") or {})
    assert not find(render({"crds.install": False}), "CustomResourceDefinition")


def test_no_crds_folder_that_helm_would_never_upgrade():
    assert not (CHART / "crds").exists()
