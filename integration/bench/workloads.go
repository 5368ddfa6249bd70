package bench

import (
	"context"
	"fmt"
	"strings"
)

// BuildWorkloads builds (or finds in the cache) v1 of every app and v2 of
// those with Update, and returns them as workloads.
func (b *Builder) BuildWorkloads(ctx context.Context, apps []App) ([]Workload, error) {
	var out []Workload
	for _, a := range apps {
		w := Workload{Name: a.Name, Check: a.Check}
		var err error
		if w.V1, err = b.Build(ctx, a, "v1"); err != nil {
			return nil, err
		}
		if a.Update {
			if w.V2, err = b.Build(ctx, a, "v2"); err != nil {
				return nil, err
			}
		}
		out = append(out, w)
	}
	return out, nil
}

// SelectApps returns the apps named in names (all when empty).
func SelectApps(names []string) ([]App, error) {
	if len(names) == 0 {
		return Apps, nil
	}
	var out []App
	for _, n := range names {
		a, ok := AppByName(n)
		if !ok {
			return nil, fmt.Errorf("unknown image %q (have redis, nginx, python3, nodejs, jre)", n)
		}
		out = append(out, a)
	}
	return out, nil
}

// SelectProfiles returns the profiles named in names (all when empty).
func SelectProfiles(names []string) ([]Profile, error) {
	if len(names) == 0 {
		return Profiles, nil
	}
	var out []Profile
	for _, n := range names {
		p, ok := ProfileByName(n)
		if !ok {
			return nil, fmt.Errorf("unknown profile %q (have LAN, WAN, edge)", n)
		}
		out = append(out, p)
	}
	return out, nil
}

// SelectSystems returns the systems named in names in result order (all
// when empty).
func SelectSystems(names []string) ([]string, error) {
	if len(names) == 0 {
		return AllSystems(), nil
	}
	want := map[string]bool{}
	for _, n := range names {
		known := false
		for _, s := range AllSystems() {
			known = known || s == n
		}
		if !known {
			return nil, fmt.Errorf("unknown system %q (have %s)", n, strings.Join(AllSystems(), ", "))
		}
		want[n] = true
	}
	var out []string
	for _, s := range AllSystems() {
		if want[s] {
			out = append(out, s)
		}
	}
	return out, nil
}
