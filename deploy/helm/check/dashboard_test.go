package check

import (
	"encoding/json"
	"io/fs"
	"os"
	"path/filepath"
	"regexp"
	"strings"
	"testing"
)

// TestDashboard checks deploy/grafana/starlight.json: it is a dashboard
// JSON, and every Starlight metric its queries name is one the daemons
// define (Namespace "starlight", its Subsystem and Name in the Go sources).
func TestDashboard(t *testing.T) {
	b, err := os.ReadFile(filepath.Join("..", "..", "grafana", "starlight.json"))
	if err != nil {
		t.Fatal(err)
	}
	var dash struct {
		Title  string `json:"title"`
		Panels []struct {
			Title   string `json:"title"`
			Targets []struct {
				Expr string `json:"expr"`
			} `json:"targets"`
		} `json:"panels"`
	}
	if err := json.Unmarshal(b, &dash); err != nil || dash.Title == "" {
		t.Fatalf("the dashboard does not decode: %v", err)
	}

	defined := map[string]bool{}
	def := regexp.MustCompile(`Namespace: "starlight", Subsystem: "(\w+)", Name: "(\w+)"`)
	root := filepath.Join("..", "..", "..")
	err = filepath.WalkDir(root, func(path string, d fs.DirEntry, err error) error {
		if err != nil || d.IsDir() || !strings.HasSuffix(path, ".go") || strings.HasSuffix(path, "_test.go") {
			return err
		}
		src, err := os.ReadFile(path)
		if err != nil {
			return err
		}
		for _, m := range def.FindAllStringSubmatch(string(src), -1) {
			defined["starlight_"+m[1]+"_"+m[2]] = true
		}
		return nil
	})
	if err != nil {
		t.Fatal(err)
	}

	used := regexp.MustCompile(`starlight_\w+`)
	n := 0
	for _, p := range dash.Panels {
		for _, target := range p.Targets {
			for _, name := range used.FindAllString(target.Expr, -1) {
				n++
				base := strings.TrimSuffix(strings.TrimSuffix(strings.TrimSuffix(name, "_bucket"), "_sum"), "_count")
				if !defined[base] {
					t.Errorf("panel %q queries %s, which no daemon defines", p.Title, name)
				}
			}
		}
	}
	if n == 0 {
		t.Error("the dashboard queries no Starlight metric")
	}
}
