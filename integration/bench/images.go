package bench

import (
	"bufio"
	"context"
	"crypto/sha256"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"time"

	"golang.org/x/sys/unix"

	"github.com/starlight-project/starlight/integration/harness"
)

// App is a benchmark application: Debian packages installed on the
// minbase rootfs, and the readiness check run in the container (exit 0
// means ready).
type App struct {
	Name     string
	Packages []string
	Check    []string
	// Update builds a v2 on the security-upgraded base.
	Update bool
}

// Apps are the realistic images of the benchmark.
var Apps = []App{
	{Name: "redis", Packages: []string{"redis-server"}, Update: true, Check: []string{"/bin/sh", "-c",
		`redis-server --port 0 --unixsocket /tmp/redis.sock --save "" --daemonize yes >/dev/null || exit 1
for i in $(seq 1 200); do [ "$(redis-cli -s /tmp/redis.sock ping 2>/dev/null)" = PONG ] && exit 0; sleep 0.05; done
exit 1`}},
	{Name: "nginx", Packages: []string{"nginx"}, Update: true, Check: []string{"nginx", "-t", "-q"}},
	{Name: "python3", Packages: []string{"python3"}, Update: true,
		Check: []string{"python3", "-c", "import json,sqlite3; print('ok')"}},
	{Name: "nodejs", Packages: []string{"nodejs"}, Update: true, Check: []string{"node", "-e", "console.log(1)"}},
	{Name: "jre", Packages: []string{"openjdk-17-jre-headless"}, Update: true, Check: []string{"java", "-version"}},
}

// AppByName returns the app called name.
func AppByName(name string) (App, bool) {
	for _, a := range Apps {
		if a.Name == name {
			return a, true
		}
	}
	return App{}, false
}

// builderVersion is part of every cache key: bump it when the way images
// are built changes.
const builderVersion = "1"

// Mirrors are the Debian archives the images are built from.
type Mirrors struct {
	Debian   string // e.g. http://deb.debian.org/debian
	Security string // e.g. http://deb.debian.org/debian-security
}

// SystemMirrors reads apt's configured mirrors (deb822 .sources and
// one-line .list files) and falls back to deb.debian.org.
func SystemMirrors() Mirrors {
	m := Mirrors{}
	files, _ := filepath.Glob("/etc/apt/sources.list.d/*.sources")
	files = append(files, "/etc/apt/sources.list")
	list, _ := filepath.Glob("/etc/apt/sources.list.d/*.list")
	files = append(files, list...)
	for _, f := range files {
		fh, err := os.Open(f)
		if err != nil {
			continue
		}
		sc := bufio.NewScanner(fh)
		for sc.Scan() {
			line := strings.TrimSpace(sc.Text())
			var uris []string
			switch {
			case strings.HasPrefix(line, "URIs:"):
				uris = strings.Fields(strings.TrimPrefix(line, "URIs:"))
			case strings.HasPrefix(line, "deb "):
				for _, w := range strings.Fields(line)[1:] {
					if strings.HasPrefix(w, "http") {
						uris = append(uris, w)
						break
					}
				}
			}
			for _, u := range uris {
				u = strings.TrimRight(u, "/")
				switch {
				case strings.HasSuffix(u, "/debian-security") && m.Security == "":
					m.Security = u
				case strings.HasSuffix(u, "/debian") && m.Debian == "":
					m.Debian = u
				}
			}
		}
		fh.Close()
	}
	if m.Debian == "" {
		m.Debian = "http://deb.debian.org/debian"
	}
	if m.Security == "" {
		m.Security = "http://deb.debian.org/debian-security"
	}
	return m
}

// Builder builds the benchmark's Debian images into a cache directory,
// keyed by a hash of each recipe, so that reruns skip the build.
type Builder struct {
	Cache   string
	Mirrors Mirrors
	Logf    func(format string, args ...any)
}

// BuiltImage is an image ready for `docker load`.
type BuiltImage struct {
	App     string
	Version string // v1 or v2
	Name    string // the name docker load gives it
	Archive string
	Check   []string
	Layers  []string // diff IDs
}

type baseLayer struct {
	rootfs, tar, diffID, key string
}

// cacheGoMod makes the cache its own Go module: `go test ./...` from the
// repository root then skips it instead of walking root filesystems (with
// /proc mounted while an image builds).
const cacheGoMod = `// The benchmark's image cache holds Debian root filesystems. This file makes
// it a module of its own so that "go ... ./..." does not walk into it.
module starlight.invalid/bench-cache
`

func (b *Builder) prepareCache() error {
	if err := os.MkdirAll(b.Cache, 0o755); err != nil {
		return err
	}
	p := filepath.Join(b.Cache, "go.mod")
	if _, err := os.Stat(p); err == nil {
		return nil
	}
	return os.WriteFile(p, []byte(cacheGoMod), 0o644)
}

// cached reports whether dir holds a finished build (its meta.json).
func cached(dir string, meta any) bool {
	b, err := os.ReadFile(filepath.Join(dir, "meta.json"))
	if err != nil {
		return false
	}
	return json.Unmarshal(b, meta) == nil
}

func writeMeta(dir string, meta any) error {
	b, err := json.MarshalIndent(meta, "", "  ")
	if err != nil {
		return err
	}
	return os.WriteFile(filepath.Join(dir, "meta.json"), b, 0o644)
}

func recipeKey(parts ...any) string {
	b, _ := json.Marshal(append([]any{builderVersion}, parts...))
	sum := sha256.Sum256(b)
	return hex.EncodeToString(sum[:])[:16]
}

// sourcesList is the image's /etc/apt/sources.list. v1 images are built
// from the bookworm release only; v2 images add bookworm-updates and
// bookworm-security, as a rebuild months later would.
func (b *Builder) sourcesList(security bool) string {
	s := fmt.Sprintf("deb %s bookworm main\n", b.Mirrors.Debian)
	if security {
		s += fmt.Sprintf("deb %s bookworm-updates main\ndeb %s bookworm-security main\n", b.Mirrors.Debian, b.Mirrors.Security)
	}
	return s
}

// base returns the base rootfs: v1 is a fresh debootstrap --variant=minbase
// of bookworm; v2 is v1 upgraded with the security updates.
func (b *Builder) base(ctx context.Context, v2 bool) (baseLayer, error) {
	v1key := recipeKey("base", "debootstrap", "--variant=minbase", "bookworm", b.sourcesList(false))
	key, name := v1key, "base-v1-"+v1key
	var parent baseLayer
	if v2 {
		var err error
		if parent, err = b.base(ctx, false); err != nil {
			return baseLayer{}, err
		}
		key = recipeKey("base-upgrade", v1key, b.sourcesList(true))
		name = "base-v2-" + key
	}
	dir := filepath.Join(b.Cache, name)
	var m struct{ DiffID string }
	if cached(dir, &m) {
		return baseLayer{rootfs: filepath.Join(dir, "rootfs"), tar: filepath.Join(dir, "layer.tar"), diffID: m.DiffID, key: key}, nil
	}
	if err := os.RemoveAll(dir); err != nil {
		return baseLayer{}, err
	}
	if err := os.MkdirAll(dir, 0o755); err != nil {
		return baseLayer{}, err
	}
	rootfs := filepath.Join(dir, "rootfs")
	start := time.Now()
	if !v2 {
		b.Logf("building the base rootfs: debootstrap --variant=minbase bookworm (%s)", b.Mirrors.Debian)
		if err := b.run(ctx, dir, "debootstrap", "--variant=minbase", "bookworm", rootfs, b.Mirrors.Debian); err != nil {
			return baseLayer{}, err
		}
		if err := os.WriteFile(filepath.Join(rootfs, "etc/apt/sources.list"), []byte(b.sourcesList(false)), 0o644); err != nil {
			return baseLayer{}, err
		}
	} else {
		b.Logf("building the v2 base: v1 base + apt-get upgrade from bookworm-security")
		if err := b.run(ctx, dir, "cp", "-a", parent.rootfs, rootfs); err != nil {
			return baseLayer{}, err
		}
		if err := os.WriteFile(filepath.Join(rootfs, "etc/apt/sources.list"), []byte(b.sourcesList(true)), 0o644); err != nil {
			return baseLayer{}, err
		}
		if err := b.chroot(ctx, dir, rootfs, "apt-get update -qq && apt-get -y -qq upgrade && apt-get -y -qq autoremove"); err != nil {
			return baseLayer{}, err
		}
	}
	// What docker's debian images also leave out: package caches and lists.
	for _, g := range []string{"var/cache/apt/archives/*.deb", "var/cache/apt/*.bin", "var/lib/apt/lists/*_*"} {
		matches, _ := filepath.Glob(filepath.Join(rootfs, g))
		for _, p := range matches {
			_ = os.RemoveAll(p)
		}
	}
	// An empty resolv.conf: the builder binds the host's over it, a
	// runtime its own.
	if err := os.WriteFile(filepath.Join(rootfs, "etc/resolv.conf"), nil, 0o644); err != nil {
		return baseLayer{}, err
	}
	diffID, err := writeLayerTar(rootfs, filepath.Join(dir, "layer.tar"), false)
	if err != nil {
		return baseLayer{}, err
	}
	if err := writeMeta(dir, struct{ DiffID string }{diffID}); err != nil {
		return baseLayer{}, err
	}
	b.Logf("built %s in %s", name, time.Since(start).Round(time.Second))
	return baseLayer{rootfs: rootfs, tar: filepath.Join(dir, "layer.tar"), diffID: diffID, key: key}, nil
}

// Build returns app's image at version v1 or v2: the base layer and one
// layer with the app's packages, installed with apt-get in a chroot on an
// overlayfs over the base so that the layer holds exactly the changes.
// The readiness check is run in the chroot before the image is accepted.
func (b *Builder) Build(ctx context.Context, app App, version string) (*BuiltImage, error) {
	if !safeName(app.Name) {
		return nil, fmt.Errorf("bad app name %q", app.Name)
	}
	if err := b.prepareCache(); err != nil {
		return nil, fmt.Errorf("image cache: %w", err)
	}
	v2 := version == "v2"
	base, err := b.base(ctx, v2)
	if err != nil {
		return nil, fmt.Errorf("base of %s:%s: %w", app.Name, version, err)
	}
	install := fmt.Sprintf("printf '#!/bin/sh\\nexit 101\\n' >/usr/sbin/policy-rc.d && chmod 755 /usr/sbin/policy-rc.d && "+
		"apt-get update -qq && apt-get install -y -qq --no-install-recommends %s && apt-get clean && "+
		"rm -rf /var/lib/apt/lists/*_* /var/cache/apt/*.bin /usr/sbin/policy-rc.d", strings.Join(app.Packages, " "))
	key := recipeKey("app", base.key, install, app.Check)
	dir := filepath.Join(b.Cache, fmt.Sprintf("%s-%s-%s", app.Name, version, key))
	name := fmt.Sprintf("starlight-bench/%s:%s", app.Name, version)
	var meta BuiltImage
	if cached(dir, &meta) {
		meta.Archive = filepath.Join(dir, "image.tar")
		return &meta, nil
	}
	if err := os.RemoveAll(dir); err != nil {
		return nil, err
	}
	if err := os.MkdirAll(dir, 0o755); err != nil {
		return nil, err
	}
	start := time.Now()
	b.Logf("building %s: apt-get install %s on the %s base", name, strings.Join(app.Packages, " "), version)
	work, err := os.MkdirTemp(b.Cache, "tmp-"+app.Name+"-")
	if err != nil {
		return nil, err
	}
	defer os.RemoveAll(work)
	upper, wdir, merged := filepath.Join(work, "upper"), filepath.Join(work, "work"), filepath.Join(work, "merged")
	for _, d := range []string{upper, wdir, merged} {
		if err := os.MkdirAll(d, 0o755); err != nil {
			return nil, err
		}
	}
	opts := fmt.Sprintf("lowerdir=%s,upperdir=%s,workdir=%s", base.rootfs, upper, wdir)
	if err := unix.Mount("overlay", merged, "overlay", 0, opts+",index=off,redirect_dir=off,metacopy=off"); err != nil {
		if err := unix.Mount("overlay", merged, "overlay", 0, opts); err != nil {
			return nil, fmt.Errorf("overlay mount for %s: %w", name, err)
		}
	}
	err = b.chroot(ctx, work, merged, install)
	unmount(merged)
	if err != nil {
		return nil, fmt.Errorf("building %s: %w", name, err)
	}
	appTar := filepath.Join(work, "app.tar")
	appDiff, err := writeLayerTar(upper, appTar, true)
	if err != nil {
		return nil, err
	}
	if err := b.checkImage(ctx, work, base.rootfs, upper, app.Check); err != nil {
		return nil, fmt.Errorf("readiness check of %s: %w", name, err)
	}
	img, err := harness.WriteArchive(filepath.Join(dir, "image.tar"), name, []string{base.tar, appTar},
		[]string{base.diffID, appDiff}, harness.ArchiveConfig{
			Cmd:     app.Check,
			History: []string{"debootstrap --variant=minbase bookworm (" + version + " base)", "apt-get install --no-install-recommends " + strings.Join(app.Packages, " ")},
		})
	if err != nil {
		return nil, err
	}
	meta = BuiltImage{App: app.Name, Version: version, Name: name, Archive: img.Archive, Check: app.Check, Layers: img.DiffIDs}
	if err := writeMeta(dir, meta); err != nil {
		return nil, err
	}
	b.Logf("built %s in %s", name, time.Since(start).Round(time.Second))
	return &meta, nil
}

// checkImage runs the readiness check on a throwaway overlay of the built
// layers, in its own PID namespace so that a daemon it starts (redis) dies
// with it.
func (b *Builder) checkImage(ctx context.Context, work, lower, upper string, check []string) error {
	dir := filepath.Join(work, "check")
	u, w, m := filepath.Join(dir, "upper"), filepath.Join(dir, "work"), filepath.Join(dir, "merged")
	for _, d := range []string{u, w, m} {
		if err := os.MkdirAll(d, 0o755); err != nil {
			return err
		}
	}
	if err := unix.Mount("overlay", m, "overlay", 0, fmt.Sprintf("lowerdir=%s:%s,upperdir=%s,workdir=%s", upper, lower, u, w)); err != nil {
		return fmt.Errorf("overlay mount: %w", err)
	}
	defer unmount(m)
	return b.chrootArgv(ctx, work, m, check, "unshare", "--pid", "--fork", "--kill-child")
}

// chroot runs script with /bin/sh in root, with /proc, /dev and the host's
// resolv.conf mounted for the time of the command.
func (b *Builder) chroot(ctx context.Context, logDir, root, script string) error {
	return b.chrootArgv(ctx, logDir, root, []string{"/bin/sh", "-ec", script})
}

// chrootArgv runs argv in root; wrap, if given, is the command line that
// runs chroot (e.g. unshare).
func (b *Builder) chrootArgv(ctx context.Context, logDir, root string, argv []string, wrap ...string) error {
	var mounted []string
	defer func() {
		for i := len(mounted) - 1; i >= 0; i-- {
			unmount(mounted[i])
		}
	}()
	for _, m := range []struct {
		src, dst, fstype string
		flags            uintptr
	}{
		{"proc", "proc", "proc", 0},
		{"/dev", "dev", "", unix.MS_BIND | unix.MS_REC},
		{"/etc/resolv.conf", "etc/resolv.conf", "", unix.MS_BIND},
	} {
		dst := filepath.Join(root, m.dst)
		if err := unix.Mount(m.src, dst, m.fstype, m.flags, ""); err != nil {
			return fmt.Errorf("mount %s on %s: %w", m.src, dst, err)
		}
		mounted = append(mounted, dst)
	}
	args := append([]string{root, "/usr/bin/env", "-i",
		"PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
		"DEBIAN_FRONTEND=noninteractive", "LANG=C.UTF-8", "HOME=/root"}, argv...)
	if len(wrap) > 0 {
		return b.run(ctx, logDir, wrap[0], append(append(wrap[1:], "chroot"), args...)...)
	}
	return b.run(ctx, logDir, "chroot", args...)
}

// run runs a build command, its output appended to logDir/build.log.
func (b *Builder) run(ctx context.Context, logDir, name string, args ...string) error {
	logPath := filepath.Join(logDir, "build.log")
	lf, err := os.OpenFile(logPath, os.O_CREATE|os.O_WRONLY|os.O_APPEND, 0o644)
	if err != nil {
		return err
	}
	defer lf.Close()
	fmt.Fprintf(lf, "+ %s %s\n", name, strings.Join(args, " "))
	cmd := exec.CommandContext(ctx, name, args...)
	cmd.Stdout, cmd.Stderr = lf, lf
	if err := cmd.Run(); err != nil {
		tail, _ := os.ReadFile(logPath)
		if len(tail) > 4096 {
			tail = tail[len(tail)-4096:]
		}
		return fmt.Errorf("%s %s: %w\n%s", name, strings.Join(args, " "), err, tail)
	}
	return nil
}

func unmount(p string) {
	if err := unix.Unmount(p, 0); err != nil && !errors.Is(err, unix.EINVAL) {
		_ = unix.Unmount(p, unix.MNT_DETACH)
	}
}
