# shellcheck shell=bash
# Shared shell helpers for scripts/check and scripts/demo. Source this file instead of running it.

# Debian 12 packages that building and testing taser needs. libboost-all-dev is left out on
# purpose: it is Boost 1.74 and conflicts with the 1.81 development packages.
# libclang-rt-14-dev contains clang's sanitizer runtimes, which the asan preset links against;
# clang only recommends it, so --no-install-recommends would skip it.
TASER_PACKAGES=(
    libboost1.81-dev
    libboost-program-options1.81-dev
    libssl-dev
    nlohmann-json3-dev
    libjemalloc-dev
    catch2
    cmake
    ninja-build
    ccache
    clang
    libclang-rt-14-dev
    clang-tidy
    clang-format
    python3-hvac
    python3-pytest
    curl
    openssl
    procps
    iproute2
    ca-certificates
    haproxy
    gdb
    python3-yaml
    systemd
    shellcheck
    man-db
    dpkg-dev
    golang-go
    golang-github-masterminds-sprig-dev
    golang-k8s-sigs-yaml-dev
    podman
)

# Print a progress line on stderr, prefixed with the calling script's name.
log_step() {
    printf '%s: %s\n' "${0##*/}" "$*" >&2
}

# Print an error on stderr and exit non-zero.
die() {
    printf '%s: error: %s\n' "${0##*/}" "$*" >&2
    exit 1
}

# Return success when the Debian package NAME is installed.
package_installed() {
    local status
    status=$(dpkg-query -W -f='${Status}' "$1" 2>/dev/null) || return 1
    [[ $status == "install ok installed" ]]
}

# Install the packages in TASER_PACKAGES that are missing. Runs apt-get update only when at
# least one package is missing, so a machine that has them all makes no network request.
install_packages() {
    local -a missing=()
    local package
    for package in "${TASER_PACKAGES[@]}"; do
        package_installed "$package" || missing+=("$package")
    done
    if [[ ${#missing[@]} -eq 0 ]]; then
        return 0
    fi

    local -a sudo=()
    if [[ $(id -u) -ne 0 ]]; then
        command -v sudo >/dev/null || die "missing packages (${missing[*]}) and no sudo to install them"
        sudo=(sudo)
    fi

    log_step "installing missing packages: ${missing[*]}"
    "${sudo[@]}" apt-get update -qq || die "apt-get update failed"
    "${sudo[@]}" env DEBIAN_FRONTEND=noninteractive \
        apt-get install -y -qq --no-install-recommends "${missing[@]}" ||
        die "apt-get install failed for: ${missing[*]}"
}

# Change to the repository root (the parent of scripts/).
cd_repo_root() {
    cd "$(dirname "${BASH_SOURCE[0]}")/.." || die "cannot change to the repository root"
}
