package registryext

import (
	"context"
	"errors"
	"fmt"
	"net/http"
	"net/url"
	"slices"
	"strconv"
	"strings"
	"time"

	"github.com/containerd/log"
	"github.com/containerd/platforms"
	"github.com/distribution/distribution/v3"
	"github.com/distribution/distribution/v3/configuration"
	"github.com/distribution/distribution/v3/registry/auth"
	"github.com/distribution/reference"
	"github.com/gorilla/mux"
	"github.com/opencontainers/go-digest"
	ocispec "github.com/opencontainers/image-spec/specs-go/v1"

	"github.com/starlight-project/starlight/api"
	"github.com/starlight-project/starlight/schema"
)

// PathPrefix is where the extension's routes live on the registry's
// listener.
const PathPrefix = "/starlight/"

// Handler wraps the registry's HTTP handler next: requests under
// /starlight/ are served by the extension of the database configured in
// config, every other request goes to next. It is registered with
// registry.RegisterHandler; tests call it around a handlers.App.
//
// The /starlight/ routes are outside distribution's own authorisation, so
// when config has an auth section Handler builds the same access
// controller and checks every request with it (pull scope on the
// repository, catalog scope for the job list).
func Handler(config *configuration.Configuration, next http.Handler) http.Handler {
	opts, ok, err := configOptions(config)
	if !ok {
		return next
	}
	h := &handler{opts: opts, next: next, initErr: err,
		bundles: newAdmission("bundle", make(chan struct{}, max(opts.MaxBundleStreams, 1)), opts.BundleQueueWait),
		ingests: newAdmission("trace", traceSlots, opts.BundleQueueWait)}
	if err == nil {
		h.initErr = h.configureAuth(config)
	}
	if h.initErr != nil {
		log.L.WithError(h.initErr).Error("starlight: /starlight/ routes disabled")
	}
	r := mux.NewRouter()
	r.Handle("/starlight/v1/images/{repository:.+}/{reference}", h.route(h.imageStatus)).Methods(http.MethodGet, http.MethodHead)
	r.Handle("/starlight/v1/jobs", h.route(h.jobs)).Methods(http.MethodGet, http.MethodHead)
	r.Handle("/starlight/delta", h.route(h.delta)).Methods(http.MethodPost)
	r.Handle("/starlight/v1/traces", h.route(h.traces)).Methods(http.MethodPost)
	r.NotFoundHandler = http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		api.WriteError(w, http.StatusNotFound, api.CodeNotFound, "no such route: "+r.URL.Path)
	})
	r.MethodNotAllowedHandler = http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		api.WriteError(w, http.StatusMethodNotAllowed, api.CodeMethodNotAllowed, r.Method+" is not allowed on "+r.URL.Path)
	})
	h.router = r
	return h
}

type handler struct {
	opts    Options
	next    http.Handler
	router  *mux.Router
	access  auth.AccessController // nil without auth
	initErr error
	bundles *admission // bundle streams
	ingests *admission // trace ingestions
}

func (h *handler) configureAuth(config *configuration.Configuration) error {
	typ := config.Auth.Type()
	if typ == "" || strings.EqualFold(typ, "none") {
		return nil
	}
	ac, err := auth.GetAccessController(typ, config.Auth.Parameters())
	if err != nil {
		return fmt.Errorf("configuring %s access controller: %w", typ, err)
	}
	h.access = ac
	return nil
}

func (h *handler) ServeHTTP(w http.ResponseWriter, r *http.Request) {
	if !strings.HasPrefix(r.URL.Path, PathPrefix) {
		h.next.ServeHTTP(w, r)
		return
	}
	h.router.ServeHTTP(w, r)
}

// apiError is an error with the HTTP status and code it is answered with.
type apiError struct {
	status     int
	code       api.ErrorCode
	msg        string
	retryAfter time.Duration // > 0: sent as Retry-After
}

func (e *apiError) Error() string { return e.msg }

func errorf(status int, code api.ErrorCode, format string, args ...any) error {
	return &apiError{status: status, code: code, msg: fmt.Sprintf(format, args...)}
}

// route adapts a handler function: it resolves the Extension, answers
// errors as JSON and never leaks internal errors to the client.
func (h *handler) route(fn func(w http.ResponseWriter, r *http.Request, x *Extension) error) http.Handler {
	return http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		ctx := r.Context()
		if h.initErr != nil {
			api.WriteError(w, http.StatusServiceUnavailable, api.CodeUnavailable, "the starlight extension is not configured correctly")
			return
		}
		x := Lookup(h.opts.Database)
		if x == nil || x.namespace() == nil {
			api.WriteError(w, http.StatusServiceUnavailable, api.CodeUnavailable, "the starlight extension is not running")
			return
		}
		err := fn(w, r, x)
		if err == nil {
			return
		}
		var ae *apiError
		var ch auth.Challenge
		switch {
		case ctx.Err() != nil:
			// The client has gone (or gave up waiting): nobody to answer.
			log.G(ctx).WithError(err).WithField("path", r.URL.Path).Debug("starlight: request cancelled")
		case errors.As(err, &ch):
			ch.SetHeaders(r, w)
			api.WriteError(w, http.StatusUnauthorized, api.CodeUnauthorized, "authentication required")
		case errors.As(err, &ae):
			if ae.retryAfter > 0 {
				w.Header().Set("Retry-After", strconv.Itoa(int((ae.retryAfter+time.Second-1)/time.Second)))
			} else if ae.status >= 500 {
				log.G(ctx).WithError(err).WithField("path", r.URL.Path).Error("starlight: request failed")
			}
			api.WriteError(w, ae.status, ae.code, ae.msg)
		default:
			log.G(ctx).WithError(err).WithField("path", r.URL.Path).Error("starlight: request failed")
			api.WriteError(w, http.StatusInternalServerError, api.CodeInternal, "internal error; see the registry log")
		}
	})
}

// authorize checks access to resource with the registry's access
// controller. A challenge is returned as the error. Without access it
// only authenticates the caller: every route does that before it parses
// anything of the request, so that an anonymous caller learns nothing
// from a 400 but is asked for credentials.
func (h *handler) authorize(r *http.Request, access ...auth.Access) error {
	if h.access == nil {
		return nil
	}
	_, err := h.access.Authorized(r, access...)
	if err == nil {
		return nil
	}
	var ch auth.Challenge
	if errors.As(err, &ch) {
		return ch
	}
	// Like distribution: a controller failure is not explained to the
	// client.
	log.G(r.Context()).WithError(err).Error("starlight: checking authorization")
	return errorf(http.StatusBadRequest, api.CodeUnauthorized, "authorization failed")
}

func repositoryAccess(name, action string) auth.Access {
	return auth.Access{Resource: auth.Resource{Type: "repository", Name: name}, Action: action}
}

// parseRepository validates a repository name from a request.
func parseRepository(name string) (reference.Named, error) {
	named, err := reference.WithName(name)
	if err != nil {
		return nil, errorf(http.StatusBadRequest, api.CodeBadRequest, "invalid repository name %q", name)
	}
	return named, nil
}

// resolve turns a tag or digest of repository into the pushed digest.
func (x *Extension) resolve(ctx context.Context, named reference.Named, ref string) (digest.Digest, error) {
	if strings.Contains(ref, ":") {
		d, err := api.ParseDigest(ref)
		if err != nil {
			return "", errorf(http.StatusBadRequest, api.CodeBadRequest, "%v", err)
		}
		return d, nil
	}
	if _, err := reference.WithTag(named, ref); err != nil {
		return "", errorf(http.StatusBadRequest, api.CodeBadRequest, "invalid tag %q", ref)
	}
	repo, err := x.namespace().Repository(ctx, named)
	if err != nil {
		return "", err
	}
	desc, err := repo.Tags(ctx).Get(ctx, ref)
	if err != nil {
		var unknown distribution.ErrTagUnknown
		var unknownRepo distribution.ErrRepositoryUnknown
		if errors.As(err, &unknown) || errors.As(err, &unknownRepo) {
			return "", errorf(http.StatusNotFound, api.CodeNotFound, "tag %s:%s not found", named.Name(), ref)
		}
		return "", fmt.Errorf("resolving %s:%s: %w", named.Name(), ref, err)
	}
	return desc.Digest, nil
}

// findImage returns the image a digest of repository belongs to: the
// pushed root itself, or the root whose platform manifest or converted
// image the digest is. A platform manifest that is not converted on its
// own yet but is part of a converted index is answered with the index.
func (x *Extension) findImage(ctx context.Context, repository string, dgst digest.Digest) (*schema.Image, error) {
	im, err := x.db.Image(ctx, repository, dgst.String())
	if err != nil && !errors.Is(err, schema.ErrNotFound) {
		return nil, err
	}
	if im != nil && im.State == api.StateReady {
		return im, nil
	}
	if parentDigest, _, ferr := x.db.FindImageManifest(ctx, repository, dgst.String()); ferr == nil && parentDigest != dgst.String() {
		if parent, perr := x.db.Image(ctx, repository, parentDigest); perr == nil && (im == nil || parent.State == api.StateReady) {
			return parent, nil
		}
	} else if ferr != nil && !errors.Is(ferr, schema.ErrNotFound) {
		return nil, ferr
	}
	if im != nil {
		return im, nil
	}
	im, err = x.db.ImageByConverted(ctx, repository, dgst.String())
	if errors.Is(err, schema.ErrNotFound) {
		return nil, errorf(http.StatusNotFound, api.CodeNotFound, "image %s@%s is not indexed", repository, dgst)
	}
	return im, err
}

// imageStatus serves GET /starlight/v1/images/{repository}/{reference}.
func (h *handler) imageStatus(w http.ResponseWriter, r *http.Request, x *Extension) error {
	ctx := r.Context()
	vars := mux.Vars(r)
	named, err := parseRepository(vars["repository"])
	if err != nil {
		// No scope to ask for: authenticate, then tell what is wrong.
		if aerr := h.authorize(r); aerr != nil {
			return aerr
		}
		return err
	}
	if err := h.authorize(r, repositoryAccess(named.Name(), "pull")); err != nil {
		return err
	}
	ref := vars["reference"]
	dgst, err := x.resolve(ctx, named, ref)
	if err != nil {
		return err
	}
	im, err := x.findImage(ctx, named.Name(), dgst)
	if err != nil {
		return err
	}
	st := api.ImageStatus{
		Repository:      im.Repository,
		Reference:       ref,
		Digest:          im.Digest,
		State:           im.State,
		ConvertedDigest: im.ConvertedDigest,
		Error:           im.Error,
		Attempts:        im.Attempts,
		UpdatedAt:       im.UpdatedAt,
	}
	if isTag := !strings.Contains(ref, ":"); isTag && st.State == api.StateReady && im.Digest == dgst.String() {
		// The image is converted; the converted tag of this tag exists
		// once its own job is done.
		st.ConvertedTag = ref + x.opts.TagSuffix
		job, err := x.db.Job(ctx, im.Repository, im.Digest, ref)
		switch {
		case errors.Is(err, schema.ErrNotFound):
			st.ConvertedTag = "" // tagged while autoconvert was off
		case err != nil:
			return err
		case job.State != api.StateReady:
			st.State, st.Error, st.ConvertedTag = job.State, job.Error, ""
		}
	}
	if st.State != api.StateReady {
		st.ConvertedDigest = ""
	}
	if st.Layers, st.Files, err = x.db.ImageCounts(ctx, im.Repository, im.Digest); err != nil {
		return err
	}
	api.WriteJSON(w, http.StatusOK, st)
	return nil
}

// jobs serves GET /starlight/v1/jobs[?state=queued&state=failed]: the
// conversion queue, for operators. It spans repositories, so it needs
// catalog access.
func (h *handler) jobs(w http.ResponseWriter, r *http.Request, x *Extension) error {
	if err := h.authorize(r, auth.Access{Resource: auth.Resource{Type: "registry", Name: "catalog"}, Action: "*"}); err != nil {
		return err
	}
	q, err := url.ParseQuery(r.URL.RawQuery)
	if err != nil {
		return errorf(http.StatusBadRequest, api.CodeBadRequest, "invalid query")
	}
	states := q["state"]
	for _, s := range states {
		switch s {
		case api.StateQueued, api.StateConverting, api.StateReady, api.StateFailed:
		default:
			return errorf(http.StatusBadRequest, api.CodeBadRequest, "unknown state %q", s)
		}
	}
	if len(states) == 0 {
		states = []string{api.StateQueued, api.StateConverting, api.StateFailed}
	}
	jobs, err := x.db.Jobs(r.Context(), 1000, states...)
	if err != nil {
		return err
	}
	type jobJSON struct {
		Repository string `json:"repository"`
		Digest     string `json:"digest"`
		Tag        string `json:"tag,omitempty"`
		State      string `json:"state"`
		Attempts   int    `json:"attempts"`
		Error      string `json:"error,omitempty"`
		UpdatedAt  string `json:"updatedAt"`
	}
	out := make([]jobJSON, 0, len(jobs))
	for _, j := range jobs {
		out = append(out, jobJSON{Repository: j.Repository, Digest: j.Digest, Tag: j.Tag, State: j.State,
			Attempts: j.Attempts, Error: j.Error, UpdatedAt: j.UpdatedAt.Format("2006-01-02T15:04:05.000Z07:00")})
	}
	api.WriteJSON(w, http.StatusOK, map[string]any{"jobs": out})
	return nil
}

// delta serves POST /starlight/delta: it authenticates the caller, waits
// for a stream slot (maxbundlestreams), validates the request, checks
// pull access to the repository and to the layers the worker holds,
// resolves the reference as pushed to the converted platform manifest,
// and hands over to the delta planner. The slot is held until the stream
// ends.
func (h *handler) delta(w http.ResponseWriter, r *http.Request, x *Extension) error {
	ctx := r.Context()
	if err := h.authorize(r); err != nil {
		return err
	}
	release, err := h.bundles.acquire(ctx)
	if err != nil {
		return err
	}
	defer release()
	req, named, ref, err := parseDeltaRequest(w, r)
	if err != nil {
		return err
	}
	if req.Have, err = h.authorizeDelta(r, x, named.Name(), req.Have); err != nil {
		return err
	}
	dgst, err := x.resolve(ctx, named, ref)
	if err != nil {
		return err
	}
	manifest, err := x.convertedManifest(ctx, named.Name(), dgst, req.Platform)
	if err != nil {
		return err
	}
	planner := x.deltaPlanner()
	if planner == nil {
		return errorf(http.StatusServiceUnavailable, api.CodeUnavailable, "the delta planner is not running")
	}
	planner.ServeDelta(w, r, req, manifest, named.Name())
	return nil
}

// Bounds of the access checks of a delta request's Have.
const (
	// maxOwnersPerLayer is how many repositories holding a layer are
	// considered, in name order.
	maxOwnersPerLayer = 16
	// maxOwnerChecks bounds the repositories whose pull access is checked
	// one by one when the caller may not pull all of them.
	maxOwnerChecks = 64
)

// authorizeDelta checks pull access to repository and returns the layers
// of have that the caller may pull from some repository: the planner
// leaves out the contents of the layers it is given, so a layer of a
// repository the caller may not read must not count (its contents are
// none of the caller's business, and dedup against it would tell whether
// the image shares them). A layer of repository itself counts; a layer
// no converted image lists holds nothing and is dropped. The caller with
// pull on every repository involved costs one check; others one per
// repository, at most maxOwnerChecks, the layers left unchecked dropped
// (the stream is then larger, never wrong).
func (h *handler) authorizeDelta(r *http.Request, x *Extension, repository string, have []string) ([]string, error) {
	own := repositoryAccess(repository, "pull")
	if h.access == nil {
		return have, nil
	}
	if len(have) == 0 {
		return have, h.authorize(r, own)
	}
	owners, err := x.db.LayerRepositories(r.Context(), have, maxOwnersPerLayer)
	if err != nil {
		return nil, err
	}
	granted := map[string]bool{repository: true}
	var foreign []string
	for _, l := range have {
		if repos := owners[l]; !slices.Contains(repos, repository) {
			foreign = append(foreign, repos...)
		}
	}
	slices.Sort(foreign)
	foreign = slices.Compact(foreign)
	all := false
	if len(foreign) > 0 {
		access := []auth.Access{own}
		for _, repo := range foreign {
			access = append(access, repositoryAccess(repo, "pull"))
		}
		_, err := h.access.Authorized(r, access...)
		all = err == nil
	}
	if !all {
		if err := h.authorize(r, own); err != nil {
			return nil, err
		}
		for i, repo := range foreign {
			if i == maxOwnerChecks {
				break
			}
			_, err := h.access.Authorized(r, repositoryAccess(repo, "pull"))
			granted[repo] = err == nil
		}
	}
	kept := have[:0:0]
	for _, l := range have {
		for _, repo := range owners[l] {
			if all || granted[repo] {
				kept = append(kept, l)
				break
			}
		}
	}
	if n := len(have) - len(kept); n > 0 {
		log.G(r.Context()).WithFields(log.Fields{"repository": repository, "have": len(have), "dropped": n}).
			Debug("starlight: held layers of repositories the caller may not pull are not deduplicated against")
	}
	return kept, nil
}

// parseDeltaRequest decodes and validates the body of POST /starlight/delta
// and splits its reference into repository and tag or digest.
func parseDeltaRequest(w http.ResponseWriter, r *http.Request) (api.DeltaRequest, reference.Named, string, error) {
	var req api.DeltaRequest
	if ct := r.Header.Get("Content-Type"); ct != "" && !strings.HasPrefix(ct, "application/json") {
		return req, nil, "", errorf(http.StatusUnsupportedMediaType, api.CodeUnsupportedMediaType, "Content-Type must be application/json")
	}
	decoded, err := api.DecodeDeltaRequest(http.MaxBytesReader(w, r.Body, api.MaxDeltaRequestSize))
	if err != nil {
		var tooBig *http.MaxBytesError
		if errors.As(err, &tooBig) {
			return req, nil, "", errorf(http.StatusRequestEntityTooLarge, api.CodeBadRequest, "request body larger than %d bytes", api.MaxDeltaRequestSize)
		}
		return req, nil, "", errorf(http.StatusBadRequest, api.CodeBadRequest, "%v", err)
	}
	req = *decoded
	parsed, err := reference.Parse(req.Reference)
	if err != nil {
		return req, nil, "", errorf(http.StatusBadRequest, api.CodeBadRequest, "invalid reference %q: %v", req.Reference, err)
	}
	named, ok := parsed.(reference.Named)
	if !ok {
		return req, nil, "", errorf(http.StatusBadRequest, api.CodeBadRequest, "reference %q has no repository", req.Reference)
	}
	var ref string
	switch p := parsed.(type) {
	case reference.Canonical:
		ref = p.Digest().String()
		if _, err := api.ParseDigest(ref); err != nil {
			return req, nil, "", errorf(http.StatusBadRequest, api.CodeBadRequest, "%v", err)
		}
	case reference.Tagged:
		ref = p.Tag()
	default:
		return req, nil, "", errorf(http.StatusBadRequest, api.CodeBadRequest, "reference %q has neither a tag nor a digest", req.Reference)
	}
	if req.Platform.OS == "" {
		req.Platform = api.Platform{OS: "linux", Architecture: "amd64"}
	}
	// The repository as stored by distribution: the reference's full name,
	// with no normalisation (no docker.io/library/ prefix).
	return req, named, ref, nil
}

// convertedManifest returns the converted platform manifest for the image
// dgst of repository as pushed (a root, or one of its platform manifests,
// or a converted image itself).
func (x *Extension) convertedManifest(ctx context.Context, repository string, dgst digest.Digest, platform api.Platform) (digest.Digest, error) {
	im, err := x.findImage(ctx, repository, dgst)
	if err != nil {
		return "", err
	}
	if im.State != api.StateReady {
		msg := fmt.Sprintf("image %s@%s is %s", repository, im.Digest, im.State)
		if im.Error != "" {
			msg += ": " + im.Error
		}
		return "", errorf(http.StatusConflict, api.CodeNotReady, "%s", msg)
	}
	manifests, err := x.db.ImageManifests(ctx, repository, im.Digest)
	if err != nil {
		return "", err
	}
	// A digest that names one platform manifest selects it.
	for _, m := range manifests {
		if m.OriginalDigest == dgst.String() || m.ManifestDigest == dgst.String() {
			return digest.Digest(m.ManifestDigest), nil
		}
	}
	// A single-platform image serves any platform, as a plain pull does.
	if len(manifests) == 1 && !isIndexType(im.MediaType) {
		return digest.Digest(manifests[0].ManifestDigest), nil
	}
	if m, ok := pickPlatform(manifests, platform); ok {
		return digest.Digest(m.ManifestDigest), nil
	}
	have := make([]string, 0, len(manifests))
	for _, m := range manifests {
		have = append(have, m.Platform)
	}
	return "", errorf(http.StatusNotFound, api.CodeNotFound, "image %s@%s has no %s manifest (it has %s)",
		repository, im.Digest, platform, strings.Join(have, ", "))
}

// pickPlatform returns the manifest of ms for platform the way containerd
// picks one from an index (platforms.Only): names are compared normalised
// ("linux/arm64/v8" is "linux/arm64", "aarch64" is "arm64"), a platform
// also runs the ones it is compatible with (amd64 runs 386, arm/v7 runs
// arm/v6), and the best match wins, the first in index order among equals.
// A platform without a variant also gets the only manifest of its OS and
// architecture, whatever that manifest's variant (as before).
func pickPlatform(ms []schema.ImageManifest, platform api.Platform) (schema.ImageManifest, bool) {
	want := ocispec.Platform{OS: platform.OS, Architecture: platform.Architecture, Variant: platform.Variant}
	match := platforms.Only(want)
	best := -1
	for i, m := range ms {
		p := parseStoredPlatform(m.Platform)
		if match.Match(p) && (best < 0 || match.Less(p, parseStoredPlatform(ms[best].Platform))) {
			best = i
		}
	}
	if best >= 0 {
		return ms[best], true
	}
	if platform.Variant != "" {
		return schema.ImageManifest{}, false
	}
	want = platforms.Normalize(want)
	var byArch []schema.ImageManifest
	for _, m := range ms {
		p := platforms.Normalize(parseStoredPlatform(m.Platform))
		if p.OS == want.OS && p.Architecture == want.Architecture {
			byArch = append(byArch, m)
		}
	}
	if len(byArch) == 1 {
		return byArch[0], true
	}
	return schema.ImageManifest{}, false
}

// parseStoredPlatform splits a schema.ImageManifest platform
// ("os/arch[/variant]", as the index or config had it).
func parseStoredPlatform(s string) ocispec.Platform {
	var p ocispec.Platform
	p.OS, s, _ = strings.Cut(s, "/")
	p.Architecture, p.Variant, _ = strings.Cut(s, "/")
	return p
}
