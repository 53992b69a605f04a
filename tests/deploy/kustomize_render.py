"""A small kustomize renderer, for machines without ``kubectl kustomize``.

It implements the subset of kustomize (v5) that deploy/k8s uses, with kustomize's semantics:

- ``resources`` (files and directories holding a ``kustomization.yaml``), recursively;
- ``configMapGenerator`` (``files``/``literals``, ``behavior: create|replace|merge``) with
  kustomize's content-hash name suffix, and the rewrite of every reference to the ConfigMap;
- ``patches`` as strategic-merge patches (by the patch's own kind/name, or a ``target``) or
  JSON 6902 operation lists (``add``/``remove``/``replace``);
- ``namespace``, ``namePrefix``/``nameSuffix`` (with references), ``labels`` (with
  ``includeSelectors``/``includeTemplates``), ``commonLabels``, ``commonAnnotations``, ``images``.

Anything else in a kustomization is refused loudly rather than ignored, so the renderer cannot
silently disagree with kubectl. The tests compare its output with ``kubectl kustomize``
wherever kubectl exists.
"""

from __future__ import annotations

import copy
import hashlib
import json
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import yaml

Obj = dict[str, Any]

KUSTOMIZATION_NAMES = ("kustomization.yaml", "kustomization.yml", "Kustomization")
_SUPPORTED_KEYS = {
    "apiVersion",
    "kind",
    "resources",
    "configMapGenerator",
    "generatorOptions",
    "patches",
    "namespace",
    "namePrefix",
    "nameSuffix",
    "labels",
    "commonLabels",
    "commonAnnotations",
    "images",
}

# Strategic-merge keys of the list fields deploy/k8s patches (from the Kubernetes API's
# x-kubernetes-patch-merge-key); lists not named here are replaced whole, as the API does
# for lists without a merge key (e.g. tolerations, args).
_MERGE_KEYS: dict[str, str] = {
    "containers": "name",
    "initContainers": "name",
    "ephemeralContainers": "name",
    "volumes": "name",
    "volumeMounts": "mountPath",
    "volumeDevices": "devicePath",
    "env": "name",
    "imagePullSecrets": "name",
    "topologySpreadConstraints": "topologyKey",
    "hostAliases": "ip",
    "resourceClaims": "name",
}
_PORT_LIST_KEYS = ("containerPort", "port")


class KustomizeError(Exception):
    """The kustomization uses something this renderer does not implement, or is invalid."""


def render(directory: str | Path) -> list[Obj]:
    """Render the kustomization in ``directory`` to a list of Kubernetes objects."""
    return _Kustomization(Path(directory)).build(top=True)


# ---------------------------------------------------------------------------------------------
class _Kustomization:
    def __init__(self, root: Path) -> None:
        self.root = root.resolve()
        path = next((self.root / n for n in KUSTOMIZATION_NAMES if (self.root / n).is_file()), None)
        if path is None:
            raise KustomizeError(f"{self.root} has no kustomization.yaml")
        self.spec: Obj = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
        unknown = set(self.spec) - _SUPPORTED_KEYS
        if unknown:
            raise KustomizeError(f"{path}: unsupported fields {sorted(unknown)}")

    def build(self, top: bool) -> list[Obj]:
        """Render; the ConfigMap hash suffixes are added only at the top, as kustomize does,
        so that an overlay's generator can still replace or merge a base's by name."""
        objects: list[Obj] = []
        for entry in self.spec.get("resources", []) or []:
            target = (self.root / entry).resolve()
            if target.is_dir():
                objects.extend(_Kustomization(target).build(top=False))
            else:
                objects.extend(_load_yaml_documents(target))
        self._generate_config_maps(objects)
        for patch in self.spec.get("patches", []) or []:
            self._apply_patch(objects, patch)
        self._apply_namespace(objects)
        self._apply_name_affixes(objects)
        self._apply_labels(objects)
        self._apply_annotations(objects)
        self._apply_images(objects)
        if top:
            self._apply_config_map_hashes(objects)
        return objects

    # -- generators -------------------------------------------------------------------------
    def _generate_config_maps(self, objects: list[Obj]) -> None:
        options = self.spec.get("generatorOptions", {}) or {}
        for gen in self.spec.get("configMapGenerator", []) or []:
            data: dict[str, str] = {}
            for item in gen.get("files", []) or []:
                key, _, rel = str(item).partition("=") if "=" in str(item) else (Path(item).name, "", item)
                data[key] = (self.root / rel).read_text(encoding="utf-8")
            for item in gen.get("literals", []) or []:
                key, _, value = str(item).partition("=")
                data[key] = value
            behavior = gen.get("behavior", "create")
            name = gen["name"]
            existing = [o for o in objects if o.get("kind") == "ConfigMap" and o["metadata"]["name"] == name]
            if behavior == "create":
                if existing:
                    raise KustomizeError(f"configMapGenerator {name!r}: already exists; use behavior replace/merge")
                cm: Obj = {"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": name}, "data": data}
                labels = {**(options.get("labels") or {}), **(gen.get("options", {}) or {}).get("labels", {})}
                if labels:
                    cm["metadata"]["labels"] = labels
                disable = (gen.get("options", {}) or {}).get(
                    "disableNameSuffixHash", options.get("disableNameSuffixHash", False)
                )
                cm["metadata"].setdefault("annotations", {})
                if not disable:
                    # Marked for the hash pass at the very end (after labels/namespace).
                    cm["metadata"]["annotations"]["__needs_hash__"] = "true"
                if not cm["metadata"]["annotations"]:
                    del cm["metadata"]["annotations"]
                if gen.get("namespace"):
                    cm["metadata"]["namespace"] = gen["namespace"]
                objects.append(cm)
            elif behavior in ("replace", "merge"):
                if len(existing) != 1:
                    raise KustomizeError(f"configMapGenerator {name!r}: behavior {behavior} needs one base ConfigMap")
                target = existing[0]
                target["data"] = data if behavior == "replace" else {**target.get("data", {}), **data}
            else:
                raise KustomizeError(f"configMapGenerator {name!r}: unknown behavior {behavior!r}")

    def _apply_config_map_hashes(self, objects: list[Obj]) -> None:
        renames: dict[tuple[str | None, str], str] = {}
        for obj in objects:
            annotations = obj["metadata"].get("annotations", {})
            if obj.get("kind") == "ConfigMap" and annotations.pop("__needs_hash__", None):
                if not annotations:
                    obj["metadata"].pop("annotations")
                old = obj["metadata"]["name"]
                obj["metadata"]["name"] = f"{old}-{config_map_hash(obj)}"
                renames[(obj["metadata"].get("namespace"), old)] = obj["metadata"]["name"]
        if renames:
            _rename_references(objects, "ConfigMap", renames)

    # -- patches ----------------------------------------------------------------------------
    def _apply_patch(self, objects: list[Obj], patch: Obj) -> None:
        if "path" in patch:
            text = (self.root / patch["path"]).read_text(encoding="utf-8")
        elif "patch" in patch:
            text = patch["patch"]
        else:
            raise KustomizeError(f"patch {patch!r} has neither path nor patch")
        body = yaml.safe_load(text)
        target = patch.get("target")
        if isinstance(body, list):
            if not target:
                raise KustomizeError("a JSON 6902 patch needs a target")
            matched = [o for o in objects if _matches(o, target)]
            if not matched:
                raise KustomizeError(f"JSON 6902 patch target {target!r} matches nothing")
            for obj in matched:
                for op in body:
                    _json6902(obj, op)
            return
        if not isinstance(body, dict):
            raise KustomizeError(f"patch {patch!r} is neither a mapping nor a list of operations")
        selector = target or {"kind": body.get("kind"), "name": body.get("metadata", {}).get("name")}
        matched = [o for o in objects if _matches(o, selector)]
        if not matched:
            raise KustomizeError(f"strategic merge patch for {selector!r} matches nothing")
        for obj in matched:
            patched = strategic_merge(obj, {k: v for k, v in body.items() if not (target and k == "metadata")})
            # A targeted patch's metadata must not rename the objects it is applied to.
            if target is None:
                patched["metadata"]["name"] = obj["metadata"]["name"]
            obj.clear()
            obj.update(patched)

    # -- transformers -----------------------------------------------------------------------
    def _apply_namespace(self, objects: list[Obj]) -> None:
        namespace = self.spec.get("namespace")
        if not namespace:
            return
        for obj in objects:
            if obj.get("kind") in _CLUSTER_SCOPED:
                continue
            obj["metadata"]["namespace"] = namespace
            # kustomize also points RoleBinding/ClusterRoleBinding subjects at the namespace;
            # deploy/k8s has none, so refuse rather than half-implement it.
            if obj.get("kind") in ("RoleBinding", "ClusterRoleBinding"):
                raise KustomizeError("namespace transformation of role bindings is not implemented")

    def _apply_name_affixes(self, objects: list[Obj]) -> None:
        prefix = self.spec.get("namePrefix", "") or ""
        suffix = self.spec.get("nameSuffix", "") or ""
        if not prefix and not suffix:
            return
        renames: dict[str, dict[tuple[str | None, str], str]] = {}
        for obj in objects:
            if obj.get("kind") in ("Namespace", "CustomResourceDefinition"):
                continue
            old = obj["metadata"]["name"]
            obj["metadata"]["name"] = f"{prefix}{old}{suffix}"
            renames.setdefault(obj["kind"], {})[(obj["metadata"].get("namespace"), old)] = obj["metadata"]["name"]
        for kind, mapping in renames.items():
            _rename_references(objects, kind, mapping)

    def _apply_labels(self, objects: list[Obj]) -> None:
        entries: list[tuple[dict[str, str], bool, bool]] = []
        for entry in self.spec.get("labels", []) or []:
            selectors = bool(entry.get("includeSelectors", False))
            templates = bool(entry.get("includeTemplates", False)) or selectors
            entries.append((dict(entry.get("pairs", {})), selectors, templates))
        if self.spec.get("commonLabels"):
            entries.append((dict(self.spec["commonLabels"]), True, True))
        for pairs, selectors, templates in entries:
            for obj in objects:
                obj["metadata"].setdefault("labels", {}).update(pairs)
                if templates:
                    for tmpl in _pod_templates(obj):
                        tmpl.setdefault("metadata", {}).setdefault("labels", {}).update(pairs)
                if selectors:
                    for selector in _selectors(obj):
                        selector.update(pairs)

    def _apply_annotations(self, objects: list[Obj]) -> None:
        annotations = self.spec.get("commonAnnotations") or {}
        if not annotations:
            return
        for obj in objects:
            obj["metadata"].setdefault("annotations", {}).update(annotations)
            for tmpl in _pod_templates(obj):
                tmpl.setdefault("metadata", {}).setdefault("annotations", {}).update(annotations)

    def _apply_images(self, objects: list[Obj]) -> None:
        for image in self.spec.get("images", []) or []:
            for obj in objects:
                for container in _containers(obj):
                    ref = container.get("image", "")
                    name, tag, digest = _split_image(ref)
                    if name != image["name"]:
                        continue
                    new_name = image.get("newName", name)
                    if image.get("digest"):
                        container["image"] = f"{new_name}@{image['digest']}"
                    elif image.get("newTag"):
                        container["image"] = f"{new_name}:{image['newTag']}"
                    else:
                        container["image"] = new_name + (f"@{digest}" if digest else f":{tag}" if tag else "")


# ---------------------------------------------------------------------------------------------
_CLUSTER_SCOPED = {
    "Namespace",
    "ClusterRole",
    "ClusterRoleBinding",
    "CustomResourceDefinition",
    "PersistentVolume",
    "StorageClass",
    "PriorityClass",
    "APIService",
    "ValidatingWebhookConfiguration",
    "MutatingWebhookConfiguration",
}
_WORKLOADS = {"Deployment", "StatefulSet", "DaemonSet", "ReplicaSet", "Job"}


def _load_yaml_documents(path: Path) -> list[Obj]:
    docs = [d for d in yaml.safe_load_all(path.read_text(encoding="utf-8")) if d]
    for doc in docs:
        if not isinstance(doc, dict) or "kind" not in doc or "metadata" not in doc:
            raise KustomizeError(f"{path}: every document must be a Kubernetes object")
    return docs


def _matches(obj: Obj, target: Obj) -> bool:
    if target.get("kind") and obj.get("kind") != target["kind"]:
        return False
    if target.get("name") and obj["metadata"].get("name") != target["name"]:
        return False
    if target.get("namespace") and obj["metadata"].get("namespace") != target["namespace"]:
        return False
    if target.get("group") or target.get("version"):
        group, _, version = obj.get("apiVersion", "").rpartition("/")
        if target.get("group") is not None and target.get("group") != group:
            return False
        if target.get("version") and target["version"] != version:
            return False
    if target.get("labelSelector"):
        labels = obj["metadata"].get("labels", {})
        for clause in str(target["labelSelector"]).split(","):
            key, _, value = clause.partition("=")
            if labels.get(key.strip()) != value.strip():
                return False
    return True


def _pod_templates(obj: Obj) -> list[Obj]:
    kind = obj.get("kind")
    if kind in _WORKLOADS:
        return [obj["spec"]["template"]]
    if kind == "CronJob":
        return [obj["spec"]["jobTemplate"]["spec"]["template"]]
    return []


def _pod_specs(obj: Obj) -> list[Obj]:
    if obj.get("kind") == "Pod":
        return [obj["spec"]]
    return [t.get("spec", {}) for t in _pod_templates(obj)]


def _containers(obj: Obj) -> Iterable[Obj]:
    for spec in _pod_specs(obj):
        for key in ("initContainers", "containers", "ephemeralContainers"):
            yield from spec.get(key, []) or []


def _selectors(obj: Obj) -> list[dict[str, str]]:
    kind = obj.get("kind")
    if kind == "Service":
        return [obj.setdefault("spec", {}).setdefault("selector", {})]
    if kind in ("Deployment", "StatefulSet", "DaemonSet", "ReplicaSet", "PodDisruptionBudget"):
        return [obj["spec"].setdefault("selector", {}).setdefault("matchLabels", {})]
    return []


def _split_image(ref: str) -> tuple[str, str, str]:
    digest = ""
    if "@" in ref:
        ref, digest = ref.split("@", 1)
    tag = ""
    last = ref.rsplit("/", 1)[-1]
    if ":" in last:
        ref, tag = ref.rsplit(":", 1)
    return ref, tag, digest


def _rename_references(objects: list[Obj], kind: str, renames: dict[tuple[str | None, str], str]) -> None:
    """Point every reference to a renamed ``kind`` object at its new name (same namespace)."""

    def lookup(namespace: str | None, name: str) -> str:
        return renames.get((namespace, name), name)

    for obj in objects:
        ns = obj["metadata"].get("namespace")
        fix: Callable[[str], str] = lambda name, ns=ns: lookup(ns, name)  # noqa: E731
        if kind == "ConfigMap":
            for spec in _pod_specs(obj):
                for volume in spec.get("volumes", []) or []:
                    if "configMap" in volume:
                        volume["configMap"]["name"] = fix(volume["configMap"]["name"])
                    for source in (volume.get("projected") or {}).get("sources", []) or []:
                        if "configMap" in source:
                            source["configMap"]["name"] = fix(source["configMap"]["name"])
            for container in _containers(obj):
                for env_from in container.get("envFrom", []) or []:
                    if "configMapRef" in env_from:
                        env_from["configMapRef"]["name"] = fix(env_from["configMapRef"]["name"])
                for env in container.get("env", []) or []:
                    ref = (env.get("valueFrom") or {}).get("configMapKeyRef")
                    if ref:
                        ref["name"] = fix(ref["name"])
        elif kind == "PersistentVolumeClaim":
            for spec in _pod_specs(obj):
                for volume in spec.get("volumes", []) or []:
                    if "persistentVolumeClaim" in volume:
                        claim = volume["persistentVolumeClaim"]
                        claim["claimName"] = fix(claim["claimName"])
        elif kind == "ServiceAccount":
            for spec in _pod_specs(obj):
                if "serviceAccountName" in spec:
                    spec["serviceAccountName"] = fix(spec["serviceAccountName"])
        elif kind in ("Deployment", "StatefulSet"):
            if obj.get("kind") == "HorizontalPodAutoscaler":
                ref = obj["spec"]["scaleTargetRef"]
                if ref.get("kind") == kind:
                    ref["name"] = fix(ref["name"])


# -- strategic merge and JSON 6902 -------------------------------------------------------------
def strategic_merge(original: Any, patch: Any, field: str = "") -> Any:
    """Merge ``patch`` into ``original`` as the Kubernetes strategic merge patch does."""
    if isinstance(patch, dict) and isinstance(original, dict):
        if patch.get("$patch") == "replace":
            return {k: copy.deepcopy(v) for k, v in patch.items() if k != "$patch"}
        if patch.get("$patch") == "delete":
            return None
        merged = copy.deepcopy(original)
        for key, value in patch.items():
            if key == "$patch":
                continue
            if value is None:
                merged.pop(key, None)
            elif key in merged:
                merged[key] = strategic_merge(merged[key], value, key)
            else:
                merged[key] = _strip_directives(copy.deepcopy(value))
        return merged
    if isinstance(patch, list) and isinstance(original, list):
        merge_key = _MERGE_KEYS.get(field)
        if merge_key is None and field == "ports" and patch and isinstance(patch[0], dict):
            merge_key = next((k for k in _PORT_LIST_KEYS if k in patch[0]), None)
        if merge_key is None or not all(isinstance(i, dict) for i in patch):
            return _strip_directives(copy.deepcopy(patch))
        merged_list = copy.deepcopy(original)
        prepend: list[Any] = []
        for item in patch:
            index = next(
                (
                    i
                    for i, o in enumerate(merged_list)
                    if isinstance(o, dict) and o.get(merge_key) == item.get(merge_key)
                ),
                None,
            )
            if item.get("$patch") == "delete":
                if index is not None:
                    merged_list.pop(index)
            elif index is None:
                # New items go first, as kubectl's strategic merge orders them.
                prepend.append(_strip_directives(copy.deepcopy(item)))
            else:
                merged_list[index] = strategic_merge(merged_list[index], item, field)
        return prepend + merged_list
    return _strip_directives(copy.deepcopy(patch))


def _strip_directives(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _strip_directives(v) for k, v in value.items() if not k.startswith("$")}
    if isinstance(value, list):
        return [_strip_directives(v) for v in value]
    return value


def _json6902(obj: Obj, op: Obj) -> None:
    path = [p.replace("~1", "/").replace("~0", "~") for p in str(op["path"]).split("/")[1:]]
    if not path:
        raise KustomizeError(f"JSON 6902 op {op!r}: empty path")
    parent: Any = obj
    for part in path[:-1]:
        parent = parent[int(part)] if isinstance(parent, list) else parent[part]
    last = path[-1]
    kind = op["op"]
    if isinstance(parent, list):
        index = len(parent) if last == "-" else int(last)
        if kind == "add":
            parent.insert(index, copy.deepcopy(op["value"]))
        elif kind == "remove":
            parent.pop(index)
        elif kind == "replace":
            parent[index] = copy.deepcopy(op["value"])
        else:
            raise KustomizeError(f"JSON 6902 op {kind!r} is not implemented")
        return
    if kind == "add":
        parent[last] = copy.deepcopy(op["value"])
    elif kind == "remove":
        del parent[last]
    elif kind == "replace":
        if last not in parent:
            raise KustomizeError(f"JSON 6902 replace of missing path {op['path']!r}")
        parent[last] = copy.deepcopy(op["value"])
    else:
        raise KustomizeError(f"JSON 6902 op {kind!r} is not implemented")


# -- kustomize's ConfigMap name hash --------------------------------------------------------
def config_map_hash(cm: Obj) -> str:
    """kustomize's name suffix for a generated ConfigMap.

    sha256 of Go's ``json.Marshal`` of ``{"kind", "name", "data"[, "binaryData"]}``; its first
    10 hex characters with 0/1/3/a/e swapped for g/h/k/m/t (so suffixes never spell words).
    kustomize v5 looks the name up with a single ``"metadata/name"`` path component, which
    finds nothing, so the name it hashes is always the empty string; mirrored here because
    the output must match ``kubectl kustomize`` byte for byte.
    """
    encoded: Obj = {"kind": "ConfigMap", "name": "", "data": cm.get("data", {})}
    if isinstance(cm.get("binaryData"), dict):
        encoded["binaryData"] = cm["binaryData"]
    text = json.dumps(encoded, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    # Go's json.Marshal escapes <, > and & (and U+2028/2029) where Python does not.
    for raw, escaped in (
        ("<", "\\u003c"),
        (">", "\\u003e"),
        ("&", "\\u0026"),
        ("\u2028", "\\u2028"),
        ("\u2029", "\\u2029"),
    ):
        text = text.replace(raw, escaped)
    digest = hashlib.sha256(text.encode("utf-8")).hexdigest()
    table = {"0": "g", "1": "h", "3": "k", "a": "m", "e": "t"}
    return "".join(table.get(c, c) for c in digest[:10])
