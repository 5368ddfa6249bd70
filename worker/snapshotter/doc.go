// Package snapshotter is Starlight's containerd snapshotter: containerd's
// overlayfs snapshotter, extended with "remote" layers whose trees are
// provided by the worker: a FUSE view of a converted layer, served by the
// worker from its content store while its contents stream in, or, once the
// layer is complete, a plain directory of overlayfs metadata-only files
// over the store (LayerDataDirs). A container's rootfs is overlayfs over
// those directories, each with its chain fix where the layer's unpacking
// depends on the layers below it (LayerChainDeps).
//
// # Snapshots
//
// Two kinds of committed snapshot live side by side in one metadata store
// (root/metadata.db, containerd's snapshots/storage MetaStore):
//
//   - ordinary snapshots, exactly as the overlayfs snapshotter keeps them: an
//     active snapshot owns root/snapshots/<id>/fs (the overlay upper dir) and
//     root/snapshots/<id>/work; committing it freezes fs as a layer. This is
//     what an unpack into this snapshotter (ctr, or a layer the worker cannot
//     serve remotely) produces;
//   - remote snapshots: committed snapshots carrying the label
//     [LabelLayerDigest] with the digest of a converted (Starlight) layer.
//     They own no directory; their tree is whatever [Layers.Dir] returns for
//     that digest at mount time.
//
// A container's rootfs (an active snapshot) is an overlay mount whose
// lowerdir lists the parent chain nearest parent first: a remote parent
// contributes Layers.Dir(digest), an ordinary parent its fs dir. The upper and
// work dirs are the container's own, so all writes stay local. Views with a
// single parent are read-only bind mounts of that parent's tree; views with
// several parents are overlays without an upper dir, which the kernel mounts
// read-only. Overlay options follow the overlayfs snapshotter (index=off when
// the kernel knows it, userxattr where required) so that a rootfs here is
// identical, file by file, to the same image unpacked by containerd's
// overlayfs snapshotter: whiteouts (0:0 character devices) and opaque
// directories (trusted.overlay.opaque=y) in a layer's tree are interpreted by
// overlayfs itself, the same way as on an unpacked layer.
//
// # The remote-snapshot protocol
//
// This is containerd's remote-snapshotter protocol, the one stargz-snapshotter
// implements and containerd's unpacker (and thus CRI) speaks:
//
//  1. The caller prepares the layer's snapshot as if it were going to unpack
//     it: Prepare(key, parent, WithLabels{"containerd.io/snapshot.ref":
//     target, ...}), where target is the name the committed snapshot should
//     get (the chain ID) and the other labels identify the layer:
//     [LabelLayerDigest] when the worker creates the chain itself, or CRI's
//     "containerd.io/snapshot/cri.layer-digest" (with cri.image-ref and
//     cri.manifest-digest) on a Kubernetes pull.
//  2. The snapshotter asks [Layers.Resolve] whether the worker can provide that
//     layer. If it can, the snapshotter commits target on parent right away,
//     records the digest in target's labels, drops the temporary active
//     snapshot, and answers with an error satisfying errdefs.IsAlreadyExists.
//     It gives the same answer when target already exists. The caller then
//     skips fetching and unpacking the layer and moves on to the next one.
//     A Layers that pins what Resolve returns ([LayerUnpinner]) is told
//     when the snapshot is committed. Resolve may take as long as fetching
//     an image's header: for a CRI layer it does not know yet, the worker
//     fetches the image from its Starlight registry first.
//  3. If Resolve declines, Prepare behaves exactly like the overlayfs
//     snapshotter's: the caller gets mounts for an empty active snapshot,
//     unpacks the layer into it and commits it. Starlight and plain layers can
//     thus be mixed in one chain.
//
// Note that containerd's metadata layer forwards to a proxy snapshotter only
// the labels prefixed with "containerd.io/snapshot/" (and
// "containerd.io/snapshot.ref"); a caller going through containerd must name
// the layer with a label of that form (for example [LabelInheritedLayerDigest])
// for Resolve to see it. [LabelLayerDigest] reaches Resolve only when the
// snapshotter is called directly.
//
// Callers may not set, change or remove [LabelLayerDigest] or [LabelTraced]
// themselves (they are stripped from ordinary Prepare, View and Commit labels
// and preserved across Update), because they decide how a snapshot is
// mounted.
//
// # Traced containers
//
// With a [Tracer] (WithTracer), every active snapshot whose parent chain holds
// remote layers is offered to Tracer.Trace when it is prepared. A snapshot the
// tracer takes is labelled [LabelTraced], and its remote lowers are the
// directories Tracer.TracedDirs returns for it (the worker's private, traced
// FUSE views, one set per container) instead of Layers.Dir, at Prepare and at
// every Mounts. Tracer.Untrace is called when the snapshot is removed or
// committed. Views and untraced snapshots are not affected.
//
// A remote snapshot's usage is recorded once, at commit, from the optional
// [LayerUsager] (zero without it): walking a FUSE view to measure it would
// fetch nothing but would stall on every file that has not arrived.
//
// When the last snapshot that refers to a layer digest is removed, the
// snapshotter calls [Layers.Release] so the worker may unmount the layer.
// Calls to Layers.Dir and Layers.Release for one digest are serialised by the
// snapshotter, so a layer is never released between a Dir call and the moment
// the snapshot that needed it is counted; no lock is held across mounts of
// different layers, and no metadata transaction is held while Layers is
// called.
package snapshotter
