"""Official model folders from the Hugging Face Hub, verified; inspection of model folders."""

from phi_onnx.hub.fetch import DEFAULT_REPO, LEGACY_REPOS, VARIANTS, fetch, is_repo_id, resolve_model
from phi_onnx.hub.verify import MARKER

__all__ = ["DEFAULT_REPO", "LEGACY_REPOS", "MARKER", "VARIANTS", "fetch", "is_repo_id", "resolve_model"]
