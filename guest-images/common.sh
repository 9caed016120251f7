# Shared helpers for build-guest and build-nested (sourced, not executed).
#
# Both scripts assemble a busybox initramfs from Debian packages, cache their
# work behind a fingerprint of every input, and serialize concurrent runs
# (cargo test runs tests in parallel) with flock.

# Repo root = parent of guest-images/, wherever the checkout lives.
KLPV_ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
KLPV_IMAGES=$KLPV_ROOT/guest-images
KLPV_BUILD=$KLPV_ROOT/build

log() { printf '%s: %s\n' "${0##*/}" "$*" >&2; }
die() { log "error: $*"; exit 1; }

# --- Which guest kernel: KLPV_GUEST=6.1 (default), 6.1-amd64 or 6.12. ---
# 6.1 is Debian 12's own cloud kernel (bookworm); 6.1-amd64 is Debian 12's
# generic kernel (the amd64 flavour: another config, most drivers as
# modules); 6.12 is Debian's cloud kernel from bookworm-backports. Each has
# its own build directories, so all can be built side by side (CI tests
# them): build/guest, build/patches, build/dump, build/nested for 6.1 (the
# names they always had), the same with a "-6.1-amd64" or "-6.12" suffix for
# the others. KLPV_GUEST_META is the meta package that names the kernel
# (resolved by build-guest, never a hard-coded ABI). KLPV_GUEST_APT is empty
# for the bookworm kernels (the host's apt sources) and holds apt options
# naming a private sources list and package lists under build/ for 6.12: the
# host's /etc/apt is left alone.
KLPV_GUEST=${KLPV_GUEST:-6.1}
case $KLPV_GUEST in
6.1) KLPV_GUEST_SUFFIX= KLPV_GUEST_META=linux-image-cloud-amd64 ;;
6.1-amd64) KLPV_GUEST_SUFFIX=-6.1-amd64 KLPV_GUEST_META=linux-image-amd64 ;;
6.12) KLPV_GUEST_SUFFIX=-6.12 KLPV_GUEST_META=linux-image-cloud-amd64 ;;
*) die "KLPV_GUEST=$KLPV_GUEST: expected 6.1, 6.1-amd64 or 6.12" ;;
esac
export KLPV_GUEST
KLPV_GUEST_DIR=$KLPV_BUILD/guest$KLPV_GUEST_SUFFIX
# CPU features the QEMU TCG machines that run the guest (dump-guest's, and
# nested-run's L1, whose KVM passes its CPU on to L2) must not offer it.
# QEMU 7.2's TCG corrupts EFLAGS after 6.12's SLUB fast path
# `cmpxchg16b %gs:(%rsi); jnz` (EFLAGS became the low half of RAX, TF
# included: a #DB, then an oops or double fault in kmem_cache_alloc, in
# most nested boots and one dump in two). Without CX16 the kernel takes its
# own this_cpu_cmpxchg16b_emu instead. An emulator workaround for the test
# rigs only: the VMM offers the guest whatever CPU it has.
KLPV_GUEST_CPU_FLAGS=
[ "$KLPV_GUEST" != 6.12 ] || KLPV_GUEST_CPU_FLAGS=,-cx16
KLPV_GUEST_APT=()
if [ "$KLPV_GUEST" = 6.12 ]; then
	KLPV_APT_DIR=$KLPV_BUILD/apt-bookworm-backports
	KLPV_GUEST_APT=(
		-o "Dir::Etc::SourceList=$KLPV_APT_DIR/sources.list"
		-o Dir::Etc::SourceParts=/nonexistent
		-o "Dir::State::Lists=$KLPV_APT_DIR/lists"
		-o "Dir::Cache=$KLPV_APT_DIR/cache"
	)
fi

# Writes the private sources list for the selected guest (6.12 only) and
# refreshes its package lists when they are older than a day or missing.
guest_apt_setup() {
	[ ${#KLPV_GUEST_APT[@]} -gt 0 ] || return 0
	mkdir -p "$KLPV_APT_DIR/lists/partial" "$KLPV_APT_DIR/cache/archives/partial"
	local list="deb [signed-by=/usr/share/keyrings/debian-archive-keyring.gpg] http://deb.debian.org/debian bookworm-backports main"
	[ "$(cat "$KLPV_APT_DIR/sources.list" 2>/dev/null)" = "$list" ] ||
		echo "$list" >"$KLPV_APT_DIR/sources.list"
	if [ -z "$(find "$KLPV_APT_DIR/updated" -mmin -1440 2>/dev/null)" ]; then
		log "refreshing the bookworm-backports package lists (in ${KLPV_APT_DIR#"$KLPV_ROOT"/})"
		apt-get "${KLPV_GUEST_APT[@]}" update -qq >/dev/null ||
			die "apt-get update of bookworm-backports failed"
		touch "$KLPV_APT_DIR/updated"
	fi
}

# Install the Debian packages we use, but only those that are missing, quietly:
# a developer machine already has them, a fresh CI machine gets them here.
ensure_packages() {
	local missing=() p
	for p in "$@"; do
		dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q 'ok installed' ||
			missing+=("$p")
	done
	[ ${#missing[@]} -eq 0 ] && return 0
	# One install at a time (scripts/test runs two kernels' tiers at once,
	# and cargo test builds patch modules in parallel): dpkg's own lock
	# makes a second apt-get fail at once, not wait. The lock is on fd 5,
	# released with this function.
	mkdir -p "$KLPV_BUILD"
	exec 5>"$KLPV_BUILD/.apt.lock"
	flock 5
	missing=()
	for p in "$@"; do
		dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q 'ok installed' ||
			missing+=("$p")
	done
	if [ ${#missing[@]} -gt 0 ]; then
		log "installing ${missing[*]}"
		export DEBIAN_FRONTEND=noninteractive
		local out apt=(apt-get -o DPkg::Lock::Timeout=600 install -y -qq)
		if ! out=$("${apt[@]}" "${missing[@]}" 2>&1); then
			apt-get -o DPkg::Lock::Timeout=600 update -qq >/dev/null 2>&1 || true
			out=$("${apt[@]}" "${missing[@]}" 2>&1) || {
				printf '%s\n' "$out" >&2
				exec 5>&-
				die "apt-get install ${missing[*]} failed"
			}
		fi
	fi
	exec 5>&-
}

# kpatch's patch hook (livepatch-patch-hook.c, kpatch.lds.S and their
# headers), from Debian's kpatch-build package, as kpatch-build links it
# into every livepatch module it makes. The package is in Debian unstable
# only: its file name is looked up in unstable's package index, whose
# checksum comes from the archive's signed InRelease (checked with the
# Debian archive keyring), and the .deb is checked against the index.
# Prints the directory holding the files.
kpatch_hook() {
	local dir=$KLPV_BUILD/kpatch-hook
	mkdir -p "$KLPV_BUILD"
	# One download at a time (tests build patch modules in parallel).
	exec 6>"$KLPV_BUILD/.kpatch-hook.lock"
	flock 6
	if [ ! -s "$dir/livepatch-patch-hook.c" ]; then
		ensure_packages curl gpgv debian-archive-keyring xz-utils >&2
		local tmp mirror=http://deb.debian.org/debian
		tmp=$(mktemp -d)
		curl -fsSL -o "$tmp/InRelease" "$mirror/dists/sid/InRelease" ||
			die "cannot download Debian unstable's InRelease"
		gpgv --quiet --keyring /usr/share/keyrings/debian-archive-keyring.gpg \
			--output "$tmp/Release" "$tmp/InRelease" 2>/dev/null ||
			die "Debian unstable's InRelease does not verify against debian-archive-keyring"
		local want
		want=$(awk '/^SHA256:/{s=1;next} /^[^ ]/{s=0} s && $3=="main/binary-amd64/Packages.xz"{print $1}' "$tmp/Release")
		[ -n "$want" ] || die "Debian unstable's Release lists no main/binary-amd64/Packages.xz"
		curl -fsSL -o "$tmp/Packages.xz" "$mirror/dists/sid/main/binary-amd64/Packages.xz" ||
			die "cannot download Debian unstable's package index"
		[ "$(sha256sum <"$tmp/Packages.xz" | cut -d' ' -f1)" = "$want" ] ||
			die "Debian unstable's package index does not match its InRelease"
		local file sha
		read -r file sha < <(xzcat "$tmp/Packages.xz" | awk '
			/^Package: /{p=($2=="kpatch-build")}
			p && /^Filename: /{f=$2}
			p && /^SHA256: /{s=$2}
			p && /^$/{if(f&&s){print f, s; exit}}')
		[ -n "${file:-}" ] || die "no kpatch-build package in Debian unstable"
		log "downloading ${file##*/} (kpatch's patch hook)" >&2
		curl -fsSL -o "$tmp/kpatch-build.deb" "$mirror/$file" || die "cannot download $file"
		[ "$(sha256sum <"$tmp/kpatch-build.deb" | cut -d' ' -f1)" = "$sha" ] ||
			die "$file does not match its checksum in the package index"
		dpkg-deb -x "$tmp/kpatch-build.deb" "$tmp/root"
		[ -s "$tmp/root/usr/share/kpatch/patch/livepatch-patch-hook.c" ] ||
			die "$file has no usr/share/kpatch/patch/livepatch-patch-hook.c"
		rm -rf "$dir.tmp"
		mkdir -p "$KLPV_BUILD"
		cp -r "$tmp/root/usr/share/kpatch/patch" "$dir.tmp"
		echo "${file##*/}" >"$dir.tmp/.package"
		rm -rf "$dir" "$tmp"
		mv "$dir.tmp" "$dir"
	fi
	flock -u 6
	exec 6>&-
	echo "$dir"
}

# Take an exclusive lock for the rest of the script (released at exit).
take_lock() {
	mkdir -p "$KLPV_BUILD"
	exec 9>"$KLPV_BUILD/.$1.lock"
	flock 9
}

# Everything that identifies a set of files, cheaply: path, size, mtime.
# (Used for big binaries; scripts are hashed by content.)
stat_sig() {
	local f
	for f in "$@"; do
		stat -L -c '%n %s %Y' "$f"
	done
}

# The static busybox from busybox-static (the dynamic "busybox" package would
# also provide /bin/busybox, which is useless in an initramfs without libc).
busybox_path() {
	local b
	b=$(dpkg -L busybox-static 2>/dev/null | grep -m1 -E '/s?bin/busybox$') ||
		die "busybox-static is not installed"
	if readelf -l "$b" 2>/dev/null | grep -q 'Requesting program interpreter'; then
		die "$b is dynamically linked; need busybox-static"
	fi
	echo "$b"
}

# Skeleton of an initramfs root: busybox with one /bin symlink per applet,
# /sbin -> bin, mount points, and /dev/console so the kernel can give init
# its stdin/stdout/stderr before devtmpfs is mounted.
make_skeleton() {
	local root=$1 bb a
	bb=$(busybox_path)
	mkdir -p "$root"/{bin,dev,proc,sys,tmp,root,etc}
	ln -s bin "$root/sbin"
	cp "$bb" "$root/bin/busybox"
	for a in $("$bb" --list); do
		[ "$a" = busybox ] || ln -s busybox "$root/bin/$a"
	done
	mknod -m 600 "$root/dev/console" c 5 1 2>/dev/null ||
		log "warning: cannot mknod /dev/console (not root?); init reopens it from devtmpfs"
	chmod 1777 "$root/tmp"
}

# Copy kernel module NAME (searched in MODTREE/kernel) to DEST/NAME.ko,
# decompressing .ko.xz/.ko.zst/.ko.gz (Debian 13 kernels ship .ko.xz; insmod
# in busybox wants a plain .ko).
copy_module() {
	local modtree=$1 name=$2 dest=$3 f
	f=$(find "$modtree/kernel" \( -name "$name.ko" -o -name "$name.ko.*" \) -print -quit)
	[ -n "$f" ] || die "module $name not found under $modtree"
	mkdir -p "$dest"
	case $f in
	*.ko) cp "$f" "$dest/$name.ko" ;;
	*.ko.xz) xz -dc "$f" >"$dest/$name.ko" ;;
	*.ko.zst) ensure_packages zstd; zstd -qdc "$f" >"$dest/$name.ko" ;;
	*.ko.gz) gzip -dc "$f" >"$dest/$name.ko" ;;
	*) die "unknown module compression: $f" ;;
	esac
}

# Every module we ship must have its dependencies shipped too (insmod does not
# resolve them); catches a future kernel that splits a module.
check_module_deps() {
	local dir=$1 m d
	for m in "$dir"/*.ko; do
		for d in $(modinfo -F depends "$m" | tr ',' ' '); do
			[ -e "$dir/$d.ko" ] || die "${m##*/} needs $d.ko, which is not in the image"
		done
	done
}

# Pack ROOT into a gzip'd newc cpio at OUT (atomically). Sorted names, fixed
# owner and mtimes: the same inputs give the same bytes.
pack_cpio() {
	local root=$1 out=$2
	find "$root" -exec touch -h -d @0 {} +
	(cd "$root" && find . -mindepth 1 | LC_ALL=C sort |
		cpio -o -H newc -R 0:0 --reproducible --quiet) | gzip -6n >"$out.tmp"
	mv "$out.tmp" "$out"
}
