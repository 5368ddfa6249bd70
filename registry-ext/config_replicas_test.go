package registryext

import (
	"os"
	"strings"
	"testing"

	"github.com/distribution/distribution/v3/configuration"
)

// TestReplicaConfigFile checks the shipped configuration for replicas:
// it parses, stores content in S3, names a PostgreSQL index with the same
// options under both middleware kinds, and shares an http.secret.
func TestReplicaConfigFile(t *testing.T) {
	f, err := os.Open("../deploy/registry/config-replicas.yml")
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	config, err := configuration.Parse(f)
	if err != nil {
		t.Fatal(err)
	}
	if typ := config.Storage.Type(); typ != "s3" {
		t.Errorf("storage driver %q, want s3", typ)
	}
	if config.HTTP.Secret == "" {
		t.Error("no http.secret: replicas behind one load balancer need the same one")
	}
	var got []Options
	for _, kind := range []string{"registry", "repository"} {
		mws := config.Middleware[kind]
		if len(mws) != 1 || mws[0].Name != Name {
			t.Fatalf("middleware.%s = %+v", kind, mws)
		}
		o, err := ParseOptions(mws[0].Options)
		if err != nil {
			t.Fatal(err)
		}
		got = append(got, o)
	}
	if got[0] != got[1] {
		t.Errorf("registry and repository options differ: %+v %+v", got[0], got[1])
	}
	if o := got[0]; !strings.HasPrefix(o.Database, "postgres://") || o.Lease != DefaultLease {
		t.Errorf("options %+v: want a postgres:// database and the default lease", o)
	}
}
