// Package rootfs holds the property test of Starlight's root filesystems:
// random layer stacks, unpacked by containerd's own overlayfs snapshotter
// and applier on one side and served by Starlight (conversion, index,
// bundle, layer registry, FUSE views or materialised layers, Starlight's
// snapshotter) on the other, must give the same tree, file by file.
package rootfs
