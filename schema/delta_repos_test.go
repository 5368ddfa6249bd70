package schema

import (
	"context"
	"reflect"
	"testing"
)

func TestLayerRepositories(t *testing.T) {
	ctx := context.Background()
	db := openTest(t)
	complete := func(repo, pushed, converted string, layers ...string) {
		t.Helper()
		if err := db.UpsertImage(ctx, Image{Repository: repo, Digest: pushed, MediaType: "m", State: "queued"}); err != nil {
			t.Fatal(err)
		}
		if err := db.CompleteImage(ctx, repo, pushed, converted, "m", []ImageManifest{
			{Platform: "linux/amd64", OriginalDigest: pushed, ManifestDigest: converted, ConfigDigest: "sha256:cf", Layers: layers},
		}); err != nil {
			t.Fatal(err)
		}
	}
	for _, d := range []string{"sha256:base", "sha256:app", "sha256:secret", "sha256:orphan"} {
		if err := db.PutLayer(ctx, testLayer(d)); err != nil {
			t.Fatal(err)
		}
	}
	complete("tok/app", "sha256:p1", "sha256:c1", "sha256:base", "sha256:app")
	complete("tok/secret", "sha256:p2", "sha256:c2", "sha256:base", "sha256:secret")
	complete("a/other", "sha256:p3", "sha256:c3", "sha256:base")
	// The same manifest in two repositories (a cross-repository push).
	complete("b/copy", "sha256:p2", "sha256:c2", "sha256:base", "sha256:secret")

	for _, tc := range []struct {
		name     string
		perLayer int
		want     map[string][]string
	}{
		{"all", 10, map[string][]string{
			"sha256:base":   {"a/other", "b/copy", "tok/app", "tok/secret"},
			"sha256:app":    {"tok/app"},
			"sha256:secret": {"b/copy", "tok/secret"},
		}},
		{"at most 2", 2, map[string][]string{
			"sha256:base":   {"a/other", "b/copy"},
			"sha256:app":    {"tok/app"},
			"sha256:secret": {"b/copy", "tok/secret"},
		}},
	} {
		got, err := db.LayerRepositories(ctx, []string{"sha256:base", "sha256:app", "sha256:secret", "sha256:orphan", "sha256:unknown"}, tc.perLayer)
		if err != nil {
			t.Fatal(err)
		}
		if !reflect.DeepEqual(got, tc.want) {
			t.Errorf("%s: %v, want %v", tc.name, got, tc.want)
		}
	}
}
