package check

import (
	"bytes"
	"fmt"
	"path/filepath"
	"slices"
	"strings"
	"testing"

	"github.com/BurntSushi/toml"
	"github.com/distribution/distribution/v3/configuration"
	"github.com/starlight-project/starlight/worker/config"
	"helm.sh/helm/v3/pkg/action"
	"helm.sh/helm/v3/pkg/chart/loader"
	"helm.sh/helm/v3/pkg/chartutil"
	appsv1 "k8s.io/api/apps/v1"
	corev1 "k8s.io/api/core/v1"
	"k8s.io/apimachinery/pkg/runtime"
	kjson "k8s.io/apimachinery/pkg/runtime/serializer/json"
	"k8s.io/client-go/kubernetes/scheme"
	"os"
	"sigs.k8s.io/yaml"
)

// chartDir is the chart under test.
var chartDir = filepath.Join("..", "starlight")

// valueSets are the configurations a user would install: the defaults, a
// scaled-out registry on S3 and PostgreSQL with htpasswd, token auth with
// extra registries for the workers, and each half alone.
var valueSets = map[string]string{
	"defaults": ``,
	"scale-out": `
registry:
  replicas: 3
  host: registry.example.com
  storage:
    type: s3
    s3: {bucket: starlight, regionEndpoint: "https://s3.example.com", forcePathStyle: true, credentialsSecret: s3-keys, redirect: false}
  database:
    type: postgres
    postgres: {host: pg.example.com, passwordSecret: pg-password}
  auth:
    type: htpasswd
    htpasswd: {secret: registry-htpasswd}
worker:
  updateStrategy: RollingUpdate
  dockerConfigSecret: worker-creds
  containerd: {installConfig: true}
`,
	"token auth, more registries": `
registry:
  auth:
    type: token
    token: {realm: "https://auth.example.com/token", service: starlight, issuer: auth.example.com, rootCertBundleSecret: token-ca}
  persistence: {enabled: false}
worker:
  registries:
    - {host: far.example.com}
    - {host: "10.0.0.7:5000", plainHTTP: true}
  metricsPort: 0
`,
	"containerd 2 nodes": "worker: {containerd: {version: 2, installConfig: true}}\n",
	"registry only":      "worker: {enabled: false}\n",
	"workers only":       "registry: {enabled: false}\nworker: {registries: [{host: registry.example.com}]}\n",
}

// TestLint is `helm lint --strict` of the chart with every value set.
func TestLint(t *testing.T) {
	for name, values := range valueSets {
		t.Run(name, func(t *testing.T) {
			lint := action.NewLint()
			lint.Strict = true
			res := lint.Run([]string{chartDir}, parseValues(t, values))
			for _, m := range res.Messages {
				t.Logf("lint: %s", m)
			}
			for _, err := range res.Errors {
				t.Errorf("helm lint: %v", err)
			}
		})
	}
}

// TestTemplate is `helm template`: every rendered object decodes strictly
// (an unknown or duplicate field fails) into its Kubernetes API type, and
// the objects say what the deployment needs.
func TestTemplate(t *testing.T) {
	for name, values := range valueSets {
		t.Run(name, func(t *testing.T) {
			objs := render(t, values)
			if len(objs) == 0 {
				t.Fatal("the chart renders nothing")
			}
			for _, o := range objs {
				t.Logf("%T %s", o, name)
			}
		})
	}
}

// The worker DaemonSet has what FUSE views backing the node's containers
// need, and its configuration is one the worker accepts.
func TestWorkerDaemonSet(t *testing.T) {
	objs := render(t, valueSets["scale-out"])
	ds := one[*appsv1.DaemonSet](t, objs)
	var c corev1.Container
	for _, ct := range ds.Spec.Template.Spec.Containers {
		if ct.Name == "worker" {
			c = ct
		}
	}
	if c.SecurityContext == nil || c.SecurityContext.Privileged == nil || !*c.SecurityContext.Privileged {
		t.Error("the worker is not privileged: it cannot mount FUSE and overlayfs")
	}
	mounts := map[string]corev1.VolumeMount{}
	for _, m := range c.VolumeMounts {
		mounts[m.MountPath] = m
	}
	if m := mounts["/var/lib/starlight"]; m.MountPropagation == nil || *m.MountPropagation != corev1.MountPropagationBidirectional {
		t.Error("the worker's root is not mounted Bidirectional: containerd on the node would not see its mounts")
	}
	for _, p := range []string{"/dev/fuse", "/run/starlight", "/run/containerd", "/etc/containerd/certs.d", "/etc/starlight/docker"} {
		if _, ok := mounts[p]; !ok {
			t.Errorf("the worker does not mount %s", p)
		}
	}
	if ds.Spec.UpdateStrategy.Type != appsv1.RollingUpdateDaemonSetStrategyType {
		t.Errorf("updateStrategy %q, want the value's RollingUpdate", ds.Spec.UpdateStrategy.Type)
	}
	var holder *corev1.Container
	for i := range ds.Spec.Template.Spec.Containers {
		if c := &ds.Spec.Template.Spec.Containers[i]; c.Name == "fd-holder" {
			holder = c
		}
	}
	if holder == nil || !slices.Contains(holder.Command, "--stay") || len(holder.VolumeMounts) != 1 || holder.VolumeMounts[0].MountPath != "/var/lib/starlight" {
		t.Errorf("no fd-holder sidecar on the worker's root keeps the views across worker restarts: %+v", holder)
	}
	if len(ds.Spec.Template.Spec.InitContainers) != 1 {
		t.Error("installConfig: no init container writes the containerd snippet")
	}
	if got := render(t, ""); one[*appsv1.DaemonSet](t, got).Spec.UpdateStrategy.Type != appsv1.OnDeleteDaemonSetStrategyType {
		t.Error("the default updateStrategy restarts running workers")
	}

	cm := named[*corev1.ConfigMap](t, objs, "-worker")
	cfg := loadWorkerConfig(t, cm.Data["worker.toml"])
	if cfg.CRIProxy != "/run/starlight/cri.sock" || cfg.DockerConfig != "/etc/starlight/docker/config.json" {
		t.Errorf("worker config: cri_proxy %q, docker_config %q", cfg.CRIProxy, cfg.DockerConfig)
	}
	if cfg.FDStore != "holder" || cfg.FDHolderSocket() != "/var/lib/starlight/fd-holder.sock" {
		t.Errorf("worker config: fd_store %q, fd-holder socket %q, want the sidecar's", cfg.FDStore, cfg.FDHolderSocket())
	}
	if len(cfg.Registries) != 1 || cfg.Registries[0].Host != "registry.example.com" || cfg.Registries[0].PlainHTTP {
		t.Errorf("worker registries: %+v, want the chart's registry over HTTPS", cfg.Registries)
	}
	if !strings.Contains(cm.Data["starlight.toml"], `[proxy_plugins.starlight]`) ||
		!strings.Contains(cm.Data["starlight.toml"], `disable_snapshot_annotations = false`) {
		t.Errorf("containerd snippet:\n%s", cm.Data["starlight.toml"])
	}

	// Without registry.host, the workers reach the chart's registry by
	// its Service over plain HTTP, and the other registries as given.
	objs = render(t, valueSets["token auth, more registries"])
	cfg = loadWorkerConfig(t, named[*corev1.ConfigMap](t, objs, "-worker").Data["worker.toml"])
	want := []config.Registry{
		{Host: "starlight-test-registry.starlight.svc.cluster.local:5000", PlainHTTP: true},
		{Host: "far.example.com"}, {Host: "10.0.0.7:5000", PlainHTTP: true},
	}
	if fmt.Sprint(cfg.Registries) != fmt.Sprint(want) || cfg.Metrics != "" {
		t.Errorf("worker registries %v (metrics %q), want %v and no metrics", cfg.Registries, cfg.Metrics, want)
	}
}

// The containerd snippet is valid TOML in the syntax of the nodes'
// containerd: the proxy snapshotter, and the CRI plugin pulling into it
// with snapshot annotations and the worker's hosts.toml directory, where
// each version reads them (containerd 2 splits the CRI plugin; its image
// service is io.containerd.cri.v1.images).
func TestContainerdSnippet(t *testing.T) {
	type setting struct {
		path  []string
		value any
	}
	proxy := []setting{
		{[]string{"proxy_plugins", "starlight", "type"}, "snapshot"},
		{[]string{"proxy_plugins", "starlight", "address"}, "/run/starlight/starlight-snapshotter.sock"},
	}
	v2 := slices.Concat(proxy, []setting{
		{[]string{"version"}, int64(2)},
		{[]string{"plugins", "io.containerd.grpc.v1.cri", "containerd", "snapshotter"}, "starlight"},
		{[]string{"plugins", "io.containerd.grpc.v1.cri", "containerd", "disable_snapshot_annotations"}, false},
		{[]string{"plugins", "io.containerd.grpc.v1.cri", "registry", "config_path"}, "/etc/containerd/certs.d"},
	})
	v3 := slices.Concat(proxy, []setting{
		{[]string{"version"}, int64(3)},
		{[]string{"plugins", "io.containerd.cri.v1.images", "snapshotter"}, "starlight"},
		{[]string{"plugins", "io.containerd.cri.v1.images", "disable_snapshot_annotations"}, false},
		{[]string{"plugins", "io.containerd.cri.v1.images", "use_local_image_pull"}, true},
		{[]string{"plugins", "io.containerd.cri.v1.images", "registry", "config_path"}, "/etc/containerd/certs.d"},
	})
	for name, tc := range map[string]struct {
		values string
		want   []setting
	}{
		"default":      {"", v2},
		"containerd 1": {"worker: {containerd: {version: 1}}", v2},
		"containerd 2": {"worker: {containerd: {version: 2}}", v3},
	} {
		t.Run(name, func(t *testing.T) {
			snippet := named[*corev1.ConfigMap](t, render(t, tc.values), "-worker").Data["starlight.toml"]
			var doc map[string]any
			if _, err := toml.Decode(snippet, &doc); err != nil {
				t.Fatalf("containerd snippet: %v\n%s", err, snippet)
			}
			for _, s := range tc.want {
				if got := lookup(doc, s.path); got != s.value {
					t.Errorf("%q = %v, want %v", s.path, got, s.value)
				}
			}
			if t.Failed() {
				t.Logf("containerd snippet:\n%s", snippet)
			}
		})
	}
}

// lookup is the value at path in a decoded TOML document, nil if absent.
func lookup(doc map[string]any, path []string) any {
	var cur any = doc
	for _, key := range path {
		m, ok := cur.(map[string]any)
		if !ok {
			return nil
		}
		cur = m[key]
	}
	return cur
}

// The registry's config.yml is one distribution reads, with the secrets
// outside it, and the Deployment probes and scales as configured.
func TestRegistry(t *testing.T) {
	objs := render(t, valueSets["scale-out"])
	dep := one[*appsv1.Deployment](t, objs)
	if *dep.Spec.Replicas != 3 {
		t.Errorf("replicas %d", *dep.Spec.Replicas)
	}
	c := dep.Spec.Template.Spec.Containers[0]
	env := map[string]corev1.EnvVar{}
	for _, e := range c.Env {
		env[e.Name] = e
	}
	for name, secret := range map[string]string{"REGISTRY_STORAGE_S3_ACCESSKEY": "s3-keys", "REGISTRY_STORAGE_S3_SECRETKEY": "s3-keys", "PGPASSWORD": "pg-password", "REGISTRY_HTTP_SECRET": "starlight-test-registry"} {
		if e := env[name]; e.ValueFrom == nil || e.ValueFrom.SecretKeyRef == nil || e.ValueFrom.SecretKeyRef.Name != secret {
			t.Errorf("%s does not come from Secret %s: %+v", name, secret, e)
		}
	}
	if c.ReadinessProbe == nil || c.LivenessProbe == nil || c.StartupProbe == nil {
		t.Error("the registry lacks a probe")
	}

	cm := named[*corev1.ConfigMap](t, objs, "-registry")
	reg, err := configuration.Parse(strings.NewReader(cm.Data["config.yml"]))
	if err != nil {
		t.Fatalf("distribution refuses the config.yml: %v\n%s", err, cm.Data["config.yml"])
	}
	if reg.Storage["redirect"]["disable"] != true {
		t.Errorf("storage.redirect %v, want disable: true (s3.redirect false)", reg.Storage["redirect"])
	}
	if reg.Storage.Type() != "s3" || reg.Auth.Type() != "htpasswd" {
		t.Errorf("storage %q, auth %q", reg.Storage.Type(), reg.Auth.Type())
	}
	opts := reg.Middleware["registry"][0].Options
	if db, _ := opts["database"].(string); db != "postgres://starlight@pg.example.com:5432/starlight?sslmode=require" {
		t.Errorf("database %q", db)
	}
	for _, secret := range []string{"password", "secretkey", "accesskey"} {
		if strings.Contains(strings.ToLower(cm.Data["config.yml"]), secret+":") {
			t.Errorf("config.yml holds a %s", secret)
		}
	}

	// The default registry: one replica on a volume, probed on /v2/.
	dep = one[*appsv1.Deployment](t, render(t, ""))
	if p := dep.Spec.Template.Spec.Containers[0].ReadinessProbe; p.HTTPGet == nil || p.HTTPGet.Path != "/v2/" {
		t.Errorf("readiness probe %+v, want GET /v2/", p)
	}
	if v := dep.Spec.Template.Spec.Volumes; len(v) < 2 || v[1].PersistentVolumeClaim == nil {
		t.Errorf("the default registry keeps its data on %+v, want a PersistentVolumeClaim", v)
	}
}

// Combinations that cannot work fail at install with a message that says
// what to set.
func TestInvalidValues(t *testing.T) {
	for values, want := range map[string]string{
		"registry: {replicas: 2}": "registry.replicas > 1 needs registry.storage.type=s3",
		"registry: {replicas: 2, storage: {type: s3, s3: {bucket: b}}}": "registry.replicas > 1 needs registry.database.type=postgres",
		"registry: {storage: {type: s3}}":                               "needs registry.storage.s3.bucket",
		"registry: {auth: {type: htpasswd}}":                            "needs registry.auth.htpasswd.secret",
		"registry: {database: {type: mysql}}":                           `registry.database.type "mysql"`,
		"worker: {updateStrategy: Never}":                               `worker.updateStrategy "Never"`,
		"worker: {containerd: {version: 3}}":                            "worker.containerd.version 3: want 1",
	} {
		_, err := renderErr(t, values)
		if err == nil || !strings.Contains(err.Error(), want) {
			t.Errorf("values %s: %v, want an error containing %q", values, err, want)
		}
	}
}

func parseValues(t *testing.T, values string) map[string]any {
	t.Helper()
	v := map[string]any{}
	if err := yaml.Unmarshal([]byte(values), &v); err != nil {
		t.Fatalf("values: %v", err)
	}
	return v
}

func render(t *testing.T, values string) []runtime.Object {
	t.Helper()
	objs, err := renderErr(t, values)
	if err != nil {
		t.Fatal(err)
	}
	return objs
}

// renderErr renders the chart as `helm template starlight-test -n
// starlight` does and decodes every object strictly.
func renderErr(t *testing.T, values string) ([]runtime.Object, error) {
	t.Helper()
	chrt, err := loader.Load(chartDir)
	if err != nil {
		t.Fatalf("loading the chart: %v", err)
	}
	install := action.NewInstall(&action.Configuration{})
	install.DryRun, install.ClientOnly, install.Replace = true, true, true
	install.ReleaseName, install.Namespace = "starlight-test", "starlight"
	install.KubeVersion = &chartutil.KubeVersion{Version: "v1.30.0", Major: "1", Minor: "30"}
	rel, err := install.Run(chrt, parseValues(t, values))
	if err != nil {
		return nil, err
	}
	strict := kjson.NewSerializerWithOptions(kjson.DefaultMetaFactory, scheme.Scheme, scheme.Scheme,
		kjson.SerializerOptions{Yaml: true, Strict: true})
	var objs []runtime.Object
	for _, doc := range strings.Split(rel.Manifest, "\n---") {
		if len(bytes.TrimSpace(stripComments(doc))) == 0 {
			continue
		}
		obj, _, err := strict.Decode([]byte(doc), nil, nil)
		if err != nil {
			t.Fatalf("a rendered object does not decode strictly: %v\n%s", err, doc)
		}
		objs = append(objs, obj)
	}
	return objs, nil
}

func stripComments(doc string) []byte {
	var b bytes.Buffer
	for _, line := range strings.Split(doc, "\n") {
		if !strings.HasPrefix(strings.TrimSpace(line), "#") {
			b.WriteString(line + "\n")
		}
	}
	return b.Bytes()
}

// one returns the only object of type T.
func one[T runtime.Object](t *testing.T, objs []runtime.Object) T {
	t.Helper()
	var found []T
	for _, o := range objs {
		if v, ok := o.(T); ok {
			found = append(found, v)
		}
	}
	if len(found) != 1 {
		var zero T
		t.Fatalf("%d objects of type %T, want 1", len(found), zero)
	}
	return found[0]
}

// named returns the object of type T whose name ends in suffix.
func named[T interface {
	runtime.Object
	GetName() string
}](t *testing.T, objs []runtime.Object, suffix string) T {
	t.Helper()
	for _, o := range objs {
		if v, ok := o.(T); ok && strings.HasSuffix(v.GetName(), suffix) {
			return v
		}
	}
	var zero T
	t.Fatalf("no %T named *%s", zero, suffix)
	return zero
}

// loadWorkerConfig reads a rendered worker.toml with the worker's own
// loader, which refuses unknown keys.
func loadWorkerConfig(t *testing.T, toml string) *config.Config {
	t.Helper()
	path := filepath.Join(t.TempDir(), "worker.toml")
	if err := os.WriteFile(path, []byte(toml), 0o600); err != nil {
		t.Fatal(err)
	}
	cfg, err := config.LoadFile(path)
	if err != nil {
		t.Fatalf("the worker refuses its config: %v\n%s", err, toml)
	}
	return cfg
}

// On containerd 2 nodes the workers keep complete layers as FUSE views
// (containerd 2 cannot mount materialised layers yet); elsewhere they
// materialise them.
func TestWorkerMaterialize(t *testing.T) {
	for values, want := range map[string]bool{valueSets["containerd 2 nodes"]: false, "": true} {
		cm := named[*corev1.ConfigMap](t, render(t, values), "-worker")
		if got := loadWorkerConfig(t, cm.Data["worker.toml"]).MaterializeLayers(); got != want {
			t.Errorf("values %q: materialize %v, want %v", values, got, want)
		}
	}
}
