#!/usr/bin/env bash
# Validates the deployment files offline:
#   - every manifest under kubernetes/ (except kustomization.yaml) against the
#     Kubernetes JSON schemas shipped inside kubernetes-validate, in strict mode
#     (unknown fields are errors), for each version in KUBE_VERSIONS; an object
#     whose kind has no schema is an error too;
#   - compose.yaml against the Compose specification schema shipped inside
#     check-jsonschema;
#   - cross references no schema sees (check_refs.py): kustomization lists every
#     manifest, selectors match pods, Services/PDBs/HPA find their workloads,
#     named ports and mounted ConfigMaps exist, depends_on targets have
#     healthchecks, bind-mounted files exist, ...
#
# The validators are pip-installed (pinned in validate-requirements.txt) into a
# throwaway virtual environment under a mktemp directory, removed on exit.
# After that install nothing is fetched: where unprivileged user namespaces are
# available, the checks run in a network namespace with no network at all.
#
# Usage: deploy/validate.sh [DEPLOY_DIR]   (default: the folder of this script)
# Exits non-zero, naming what failed, on any error.
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
target="$(cd "${1:-$here}" && pwd)"
KUBE_VERSIONS="${KUBE_VERSIONS:-1.30.0 1.37.0}"

log() { printf '==> %s\n' "$*" >&2; }

if ! python3 -c 'import venv, ensurepip' >/dev/null 2>&1; then
    echo "validate.sh: python3 with venv is needed (Debian: apt-get install python3-venv)" >&2
    exit 2
fi

work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT
log "installing validators into $work/venv"
python3 -m venv "$work/venv"
"$work/venv/bin/pip" install --quiet --disable-pip-version-check --no-input \
    -r "$here/validate-requirements.txt"
bin="$work/venv/bin"

# Run a command without network when we can, to prove the checks are offline.
if unshare --user --map-root-user --net true >/dev/null 2>&1; then
    offline() { unshare --user --map-root-user --net "$@"; }
    log "checks run without network (unshare --net)"
else
    offline() { "$@"; }
    log "unshare not permitted here: checks run with the network present (they fetch nothing)"
fi

failures=()

# --- Kubernetes manifests ------------------------------------------------------
k8s="$target/kubernetes"
mapfile -t manifests < <(find "$k8s" -type f \( -name '*.yaml' -o -name '*.yml' \) \
    ! -name 'kustomization.yaml' ! -name 'kustomization.yml' | sort)
if [ "${#manifests[@]}" -eq 0 ]; then
    failures+=("no manifests found under $k8s")
fi
for version in $KUBE_VERSIONS; do
    log "kubernetes-validate $("$bin/kubernetes-validate" --version) --strict -k $version (${#manifests[@]} files)"
    status=0
    out="$(offline "$bin/kubernetes-validate" --strict --quiet -k "$version" "${manifests[@]}" 2>&1)" || status=$?
    [ -z "$out" ] || printf '%s\n' "$out"
    # A kind without a schema is only a WARN (exit 0) for the tool: not for us.
    if [ "$status" -ne 0 ] || grep -q '^WARN' <<<"$out"; then
        failures+=("kubernetes manifests against Kubernetes $version")
    fi
done

# --- Compose file --------------------------------------------------------------
compose="$target/compose.yaml"
log "check-jsonschema $("$bin/check-jsonschema" --version | awk '{print $NF}') --builtin-schema vendor.compose-spec"
if [ ! -f "$compose" ]; then
    failures+=("no $compose")
elif ! offline "$bin/check-jsonschema" --builtin-schema vendor.compose-spec "$compose"; then
    failures+=("compose.yaml against the Compose specification")
fi

# --- Cross references ----------------------------------------------------------
log "cross references (check_refs.py)"
if ! offline "$bin/python" "$here/check_refs.py" "$target"; then
    failures+=("cross references")
fi

if [ "${#failures[@]}" -ne 0 ]; then
    printf 'validate.sh: FAILED: %s\n' "${failures[@]}" >&2
    exit 1
fi
echo "validate.sh: all deployment files valid (Kubernetes ${KUBE_VERSIONS// /, }; Compose specification)"
