#!/usr/bin/env bash
# Build polyhead's images with podman on a machine that reaches no container registry: the Python base
# image from Debian's packages (mmdebstrap, then `podman import`), a wheelhouse of every dependency from the
# host's pip indexes, then deploy/docker/Dockerfile.server and Dockerfile.trainer with the base as
# PYTHON_IMAGE and pip pointed at the wheelhouse only (--no-index). Run from anywhere; see --help.
set -euo pipefail

HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
REPO="$(cd "$HERE/../.." && pwd)"

usage() {
    cat <<EOF
usage: deploy/podman/build-images.sh [options] [server] [trainer]

Build the polyhead images with podman, offline (default: both images).

  1. base      Debian bookworm minbase + python3, python3-venv (mmdebstrap from this host's apt
               sources), imported as localhost/polyhead-python-base:<key>. Cached: the key hashes the
               recipe and the apt sources; the image (and its tarball under the cache dir) is reused.
  2. wheels    every dependency of polyhead[serve,tracing] (server) or polyhead[train,minigrid] (trainer) plus
               the build backend, downloaded with the host's pip (its configured indexes) for the base's
               Python and glibc into <cache>/wheelhouse. Skipped when pyproject.toml has not changed.
  3. images    podman build of deploy/docker/Dockerfile.<image> with --build-arg PYTHON_IMAGE=<base>,
               PIP_INSTALL_OPTIONS="--no-index --find-links /wheelhouse" and the wheelhouse mounted
               read-only at /wheelhouse (podman build --volume). polyhead itself is built from the
               sources inside the build.

options:
  --tag TAG             image tag (default: the version in pyproject.toml)
  --cache-dir DIR       base tarball and wheelhouse (default: \$POLYHEAD_IMAGE_CACHE, else
                        \${XDG_CACHE_HOME:-\$HOME/.cache}/polyhead-images)
  --python-image IMAGE  use this base image instead of building one (e.g. python:3.11-slim-bookworm
                        where a registry is reachable)
  --online              no wheelhouse: pip inside the build installs from its default index (PyPI)
  --torch-index-url URL extra index for the CPU torch wheel when the host's pip indexes lack it
                        (e.g. https://download.pytorch.org/whl/cpu)
  --rebuild-base        build the base again even when it is cached
  --install-tools       apt-get install podman, mmdebstrap and runc when missing (needs root)
  --json                print a JSON summary (images, sizes, seconds per step) as the last stdout line
  -h, --help            this help

environment:
  CONTAINERS_CONF       podman configuration; default deploy/podman/containers.conf (runc, cgroupfs,
                        no default ulimits: what works on hosts with hybrid cgroups, where crun fails)
  PYTHON                the Python whose pip fills the wheelhouse (default: python3)
EOF
}

log() { printf '[build-images] %s\n' "$*" >&2; }
die() { printf '[build-images] error: %s\n' "$*" >&2; exit 2; }

TAG=""
CACHE_DIR="${POLYHEAD_IMAGE_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/polyhead-images}"
PYTHON_IMAGE=""
ONLINE=0
TORCH_INDEX_URL=""
REBUILD_BASE=0
INSTALL_TOOLS=0
JSON=0
IMAGES=()
while (($#)); do
    case "$1" in
        --tag) TAG="${2:?--tag needs a value}"; shift 2 ;;
        --cache-dir) CACHE_DIR="${2:?--cache-dir needs a value}"; shift 2 ;;
        --python-image) PYTHON_IMAGE="${2:?--python-image needs a value}"; shift 2 ;;
        --online) ONLINE=1; shift ;;
        --torch-index-url) TORCH_INDEX_URL="${2:?--torch-index-url needs a value}"; shift 2 ;;
        --rebuild-base) REBUILD_BASE=1; shift ;;
        --install-tools) INSTALL_TOOLS=1; shift ;;
        --json) JSON=1; shift ;;
        -h | --help) usage; exit 0 ;;
        server | trainer) IMAGES+=("$1"); shift ;;
        *) usage >&2; die "unknown argument '$1' (expected an option above, 'server' or 'trainer')" ;;
    esac
done
((${#IMAGES[@]})) || IMAGES=(server trainer)

PYTHON="${PYTHON:-python3}"
export CONTAINERS_CONF="${CONTAINERS_CONF:-$HERE/containers.conf}"
[[ -n "$TAG" ]] || TAG="$("$PYTHON" -c 'import sys, tomllib; print(tomllib.load(open(sys.argv[1], "rb"))["project"]["version"])' "$REPO/pyproject.toml")"
mkdir -p "$CACHE_DIR"
declare -A SECONDS_IN=()
now() { date +%s.%N; }
since() { awk -v a="$1" -v b="$(now)" 'BEGIN { printf "%.1f", b - a }'; }

# --- tools -------------------------------------------------------------------------------------------------
need=()
command -v podman >/dev/null || need+=(podman)
command -v runc >/dev/null || need+=(runc)
[[ -n "$PYTHON_IMAGE" ]] || command -v mmdebstrap >/dev/null || need+=(mmdebstrap)
if ((${#need[@]})); then
    ((INSTALL_TOOLS)) || die "missing ${need[*]}: install them (Debian: apt-get install ${need[*]}) or pass --install-tools"
    [[ $EUID -eq 0 ]] || die "--install-tools needs root to apt-get install ${need[*]}"
    t0=$(now)
    log "installing ${need[*]} with apt-get"
    apt-get update -qq >&2
    # With podman's recommends: netavark and aardvark-dns (networks with service-name DNS, which
    # podman-compose needs), catatonit, slirp4netns.
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${need[@]}" >&2
    SECONDS_IN[tools]=$(since "$t0")
fi

# --- 1. base ------------------------------------------------------------------------------------------------
# mmdebstrap without a mirror argument uses this host's apt sources (a pinned snapshot or a local mirror
# works the same); they are part of the key, so a changed source builds a new base.
BASE_PACKAGES="python3,python3-venv,python-is-python3,ca-certificates"
BASE_RECIPE="bookworm minbase $BASE_PACKAGES nodoc-v1"
if [[ -z "$PYTHON_IMAGE" ]]; then
    t0=$(now)
    key="$( { echo "$BASE_RECIPE"; cat /etc/apt/sources.list /etc/apt/sources.list.d/* 2>/dev/null || true; } \
        | sha256sum | cut -c1-16)"
    PYTHON_IMAGE="localhost/polyhead-python-base:$key"
    tarball="$CACHE_DIR/base-$key.tar"
    if ((REBUILD_BASE)); then
        podman image rm -f "$PYTHON_IMAGE" >/dev/null 2>&1 || true
        rm -f "$tarball"
    fi
    if podman image exists "$PYTHON_IMAGE"; then
        log "base: $PYTHON_IMAGE (cached image)"
    else
        if [[ ! -f "$tarball" ]]; then
            rm -rf "$tarball.partial"
            log "base: mmdebstrap bookworm ($BASE_PACKAGES) -> $tarball"
            # No documentation, manual pages or translations: 40 MB the images never read. apt's lists
            # and caches go too; the images install nothing with apt.
            mmdebstrap --variant=minbase --format=tar --include="$BASE_PACKAGES" \
                --dpkgopt='path-exclude=/usr/share/man/*' --dpkgopt='path-exclude=/usr/share/doc/*' \
                --dpkgopt='path-include=/usr/share/doc/*/copyright' \
                --dpkgopt='path-exclude=/usr/share/locale/*' --dpkgopt='path-exclude=/usr/share/info/*' \
                --customize-hook='rm -rf "$1"/var/lib/apt/lists/* "$1"/var/cache/apt/*' \
                bookworm "$tarball.partial" >&2
            mv "$tarball.partial" "$tarball"
        fi
        log "base: podman import $tarball as $PYTHON_IMAGE"
        podman import --change 'ENV LANG=C.UTF-8' --change 'CMD ["python3"]' "$tarball" "$PYTHON_IMAGE" >/dev/null
    fi
    SECONDS_IN[base]=$(since "$t0")
else
    log "base: $PYTHON_IMAGE (given)"
fi

# --- 2. wheelhouse ------------------------------------------------------------------------------------------
WHEELHOUSE="$CACHE_DIR/wheelhouse"
pip_platform_args() {
    # The base's Python version, glibc and machine, as pip download's target (the host's may differ).
    local info py glibc arch
    info="$(podman run --rm --network none "$PYTHON_IMAGE" python3 -c \
        'import platform, sys; print("%d.%d" % sys.version_info[:2], platform.libc_ver()[1], platform.machine())')"
    read -r py glibc arch <<<"$info"
    local minor="${glibc#2.}" args=(--python-version "$py" --implementation cp --abi "cp${py/./}" --only-binary=:all:)
    for ((m = minor; m >= 5; m--)); do args+=(--platform "manylinux_2_${m}_${arch}"); done
    args+=(--platform "manylinux2014_${arch}" --platform "manylinux2010_${arch}" --platform "manylinux1_${arch}")
    args+=(--platform "linux_${arch}")
    printf '%s\n' "${args[@]}"
}

fill_wheelhouse() {  # $1: image name, rest: extras
    local image="$1"; shift
    local reqs stamp t0
    reqs="$("$PYTHON" "$HERE/requirements.py" "$@")"
    if [[ "$image" == trainer ]]; then
        # The CPU build of the pinned torch, never the default PyPI wheel with its CUDA libraries.
        reqs="$(sed -E 's/^torch==([^+]+)$/torch==\1+cpu/' <<<"$reqs")"
    fi
    stamp="$WHEELHOUSE/.stamp-$image-$( { echo "$reqs"; echo "$PYTHON_IMAGE"; } | sha256sum | cut -c1-16)"
    if [[ -f "$stamp" ]]; then
        log "wheels: $image requirements unchanged, wheelhouse reused ($WHEELHOUSE)"
        return
    fi
    t0=$(now)
    mkdir -p "$WHEELHOUSE"
    local -a platform extra=()
    mapfile -t platform < <(pip_platform_args)
    [[ -z "$TORCH_INDEX_URL" ]] || extra=(--extra-index-url "$TORCH_INDEX_URL")
    log "wheels: pip download for $image ($(wc -l <<<"$reqs") requirements) into $WHEELHOUSE"
    # shellcheck disable=SC2046
    if ! "$PYTHON" -m pip download --quiet --dest "$WHEELHOUSE" "${platform[@]}" "${extra[@]}" \
        $(tr '\n' ' ' <<<"$reqs") >&2; then
        local hint=""
        [[ "$image" != trainer ]] || hint=" (the CPU torch wheel: pass --torch-index-url https://download.pytorch.org/whl/cpu)"
        die "pip could not download the $image requirements from the host's indexes$hint"
    fi
    touch "$stamp"
    SECONDS_IN[wheels_$image]=$(since "$t0")
}

BUILD_ARGS=()
if ((ONLINE)); then
    log "wheels: --online, pip inside the build uses its default index"
else
    for image in "${IMAGES[@]}"; do
        case "$image" in
            server) fill_wheelhouse server serve tracing ;;
            trainer) fill_wheelhouse trainer train minigrid ;;
        esac
    done
    BUILD_ARGS=(--volume "$WHEELHOUSE:/wheelhouse:ro"
                --build-arg "PIP_INSTALL_OPTIONS=--no-index --find-links /wheelhouse")
fi

# --- 3. images ----------------------------------------------------------------------------------------------
declare -A SIZES=()
for image in "${IMAGES[@]}"; do
    t0=$(now)
    name="localhost/polyhead-$image:$TAG"
    log "image: podman build -f deploy/docker/Dockerfile.$image -t $name"
    # --format docker: the OCI image format has no HEALTHCHECK, and podman drops it with a warning.
    podman build --file "$REPO/deploy/docker/Dockerfile.$image" \
        --ignorefile "$REPO/deploy/docker/Dockerfile.$image.dockerignore" \
        --build-arg "PYTHON_IMAGE=$PYTHON_IMAGE" "${BUILD_ARGS[@]}" \
        --format docker --layers --tag "$name" "$REPO" >&2
    SECONDS_IN[image_$image]=$(since "$t0")
    SIZES[$image]="$(podman image inspect --format '{{.Size}}' "$name")"
    log "image: $name $(awk -v b="${SIZES[$image]}" 'BEGIN { printf "%.0f MB", b / 1e6 }') in ${SECONDS_IN[image_$image]} s"
done

if ((JSON)); then
    {
        printf '{"base": "%s", "tag": "%s", "cache_dir": "%s", "images": {' "$PYTHON_IMAGE" "$TAG" "$CACHE_DIR"
        sep=""
        for image in "${IMAGES[@]}"; do
            printf '%s"%s": {"name": "localhost/polyhead-%s:%s", "size_bytes": %s}' \
                "$sep" "$image" "$image" "$TAG" "${SIZES[$image]}"
            sep=", "
        done
        printf '}, "seconds": {'
        sep=""
        for step in "${!SECONDS_IN[@]}"; do printf '%s"%s": %s' "$sep" "$step" "${SECONDS_IN[$step]}"; sep=", "; done
        printf '}}\n'
    }
fi
