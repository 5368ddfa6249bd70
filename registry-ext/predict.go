package registryext

import (
	"context"
	"encoding/json"
	"fmt"
	"io"
	"time"

	"github.com/containerd/log"
	ocispec "github.com/opencontainers/image-spec/specs-go/v1"

	"github.com/starlight-project/starlight/api"
	"github.com/starlight-project/starlight/convert"
	"github.com/starlight-project/starlight/registry-ext/predict"
)

// predictTimeout bounds the prediction of one converted image (all its
// platforms), and separately the storage of its predictions.
const predictTimeout = 10 * time.Second

// predictImage predicts, for every converted platform manifest of res,
// the files a container of it reads first (package predict), as trace
// reports to store once the image is ready. Failures are logged and
// counted; they never fail the conversion.
func (x *Extension) predictImage(ctx context.Context, store convert.Store, repository string, res *convert.ImageResult) []*api.TraceReport {
	ns := x.namespace()
	if !x.opts.Predict || ns == nil {
		return nil
	}
	ctx, cancel := context.WithTimeout(ctx, predictTimeout)
	defer cancel()
	var reports []*api.TraceReport
	for _, mr := range res.Manifests {
		logger := log.G(ctx).WithField("manifest", mr.Desc.Digest.String())
		start := time.Now()
		cfg, err := readImageConfig(ctx, store, mr.Config)
		if err != nil {
			predictions.WithLabelValues("failed").Inc()
			logger.WithError(err).Warn("starlight: startup prediction: reading the image config")
			continue
		}
		im := predict.Image{Repository: repository, Config: cfg.Config, Layers: make([]api.LayerTree, len(mr.Layers))}
		for i, lr := range mr.Layers {
			im.Layers[i] = api.LayerTree{Digest: lr.Desc.Digest.String(), Entries: lr.Index.Entries}
		}
		p, err := predict.Predict(ctx, blobOpener{ns: ns}, im, predict.DefaultLimits)
		fields := log.Fields{"files": len(p.Accesses), "read": p.Files, "bytes": p.Bytes,
			"ms": time.Since(start).Milliseconds()}
		if err != nil {
			// What was predicted before the failure still orders better
			// than nothing.
			logger.WithError(err).WithFields(fields).Warn("starlight: startup prediction cut short")
		}
		if len(p.Accesses) == 0 {
			if err != nil {
				predictions.WithLabelValues("failed").Inc()
			} else {
				predictions.WithLabelValues("empty").Inc()
				logger.WithFields(fields).Info("starlight: startup prediction: nothing to predict")
			}
			continue
		}
		reports = append(reports, predict.Report(repository, mr.Desc.Digest.String(), p))
		logger.WithFields(fields).Debug("starlight: startup predicted")
	}
	return reports
}

// readImageConfig reads a (converted) image config.
func readImageConfig(ctx context.Context, store convert.Store, desc ocispec.Descriptor) (*ocispec.Image, error) {
	rc, err := store.Fetch(ctx, desc)
	if err != nil {
		return nil, err
	}
	defer rc.Close()
	b, err := io.ReadAll(io.LimitReader(rc, api.MaxConfigSize+1))
	if err != nil {
		return nil, err
	}
	if len(b) > api.MaxConfigSize {
		return nil, fmt.Errorf("config %s larger than %d bytes", desc.Digest, api.MaxConfigSize)
	}
	var cfg ocispec.Image
	if err := json.Unmarshal(b, &cfg); err != nil {
		return nil, fmt.Errorf("config %s: %w", desc.Digest, err)
	}
	return &cfg, nil
}

// storePredictions ingests predicted reports like workers' reports, marked
// predicted (see ingestTrace), once their image is ready. Failures are
// logged and counted.
func (x *Extension) storePredictions(ctx context.Context, reports []*api.TraceReport) {
	if len(reports) == 0 {
		return
	}
	ctx, cancel := context.WithTimeout(ctx, predictTimeout)
	defer cancel()
	select {
	case traceSlots <- struct{}{}:
		defer func() { <-traceSlots }()
	case <-ctx.Done():
		predictions.WithLabelValues("failed").Add(float64(len(reports)))
		return
	}
	for _, rep := range reports {
		logger := log.G(ctx).WithField("manifest", rep.ManifestDigest)
		res, err := x.storePrediction(ctx, rep)
		if err != nil {
			predictions.WithLabelValues("failed").Inc()
			logger.WithError(err).Warn("starlight: storing the startup prediction")
			continue
		}
		predictions.WithLabelValues("stored").Inc()
		logger.WithFields(log.Fields{"trace": res.ID, "files": res.Accepted, "existing": res.Existing}).
			Info("starlight: startup prediction stored")
	}
}

func (x *Extension) storePrediction(ctx context.Context, rep *api.TraceReport) (*api.TraceResult, error) {
	if err := rep.Canonicalize(); err != nil {
		return nil, err
	}
	return x.ingestTrace(ctx, rep, true)
}
