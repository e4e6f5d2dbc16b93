// Upstream side of ipam/bench.sh: kube-apiserver's bitmap ClusterIP allocator
// (k8s.io/kubernetes pkg/registry/core/service/ipallocator, NewInMemory) in
// the same scenarios as ipam/benches/allocator.rs. bench.sh builds this file
// in a temporary module whose go.mod/go.sum come from the control-plane
// wrapper module, so the k8s.io/kubernetes version is the pinned one.
package upstreambench

import (
	"net"
	"runtime"
	"sync"
	"testing"

	api "k8s.io/kubernetes/pkg/apis/core"
	"k8s.io/kubernetes/pkg/registry/core/service/ipallocator"
	netutils "k8s.io/utils/net"
)

// The range every scenario uses: upstream's largest IPv4 service range.
const cidrText = "10.0.0.0/12"

// Allocations between two untimed releases.
const batchSize = 1000

var (
	snapshotsMu sync.Mutex
	snapshots   = map[int]*api.RangeAllocation{}
)

func newRange(b *testing.B) *ipallocator.Range {
	_, cidr, err := netutils.ParseCIDRSloppy(cidrText)
	if err != nil {
		b.Fatal(err)
	}
	r, err := ipallocator.NewInMemory(cidr)
	if err != nil {
		b.Fatal(err)
	}
	return r
}

func fill(b *testing.B, r *ipallocator.Range, percent int) {
	target := (r.Used() + r.Free()) * percent / 100
	for r.Used() < target {
		if _, err := r.AllocateNext(); err != nil {
			b.Fatal(err)
		}
	}
}

// filled returns a range at the given fill, filled by AllocateNext once per
// fill level and then restored from a snapshot, so Go's repeated benchmark
// runs do not refill.
func filled(b *testing.B, percent int) *ipallocator.Range {
	snapshotsMu.Lock()
	defer snapshotsMu.Unlock()
	snap, ok := snapshots[percent]
	if !ok {
		r := newRange(b)
		fill(b, r, percent)
		snap = &api.RangeAllocation{}
		if err := r.Snapshot(snap); err != nil {
			b.Fatal(err)
		}
		snapshots[percent] = snap
	}
	r, err := ipallocator.NewFromSnapshot(snap)
	if err != nil {
		b.Fatal(err)
	}
	return r
}

func benchAllocateNext(b *testing.B, percent int) {
	r := filled(b, percent)
	batch := make([]net.IP, 0, batchSize)
	b.ResetTimer()
	for i := 0; i < b.N; i++ {
		ip, err := r.AllocateNext()
		if err != nil {
			b.Fatal(err)
		}
		batch = append(batch, ip)
		if len(batch) == batchSize {
			b.StopTimer()
			for _, ip := range batch {
				_ = r.Release(ip)
			}
			batch = batch[:0]
			b.StartTimer()
		}
	}
}

func BenchmarkAllocateNext0(b *testing.B)  { benchAllocateNext(b, 0) }
func BenchmarkAllocateNext50(b *testing.B) { benchAllocateNext(b, 50) }
func BenchmarkAllocateNext99(b *testing.B) { benchAllocateNext(b, 99) }

func BenchmarkReleaseAllocate50(b *testing.B) {
	r := filled(b, 50)
	var ring []net.IP
	r.ForEach(func(ip net.IP) { ring = append(ring, ip) })
	b.ResetTimer()
	for i := 0; i < b.N; i++ {
		slot := i % len(ring)
		_ = r.Release(ring[slot])
		ip, err := r.AllocateNext()
		if err != nil {
			b.Fatal(err)
		}
		ring[slot] = ip
	}
}

// BenchmarkMemory50 reports the live heap of one range filled to 50 %.
func BenchmarkMemory50(b *testing.B) {
	for i := 0; i < b.N; i++ {
		var before, after runtime.MemStats
		runtime.GC()
		runtime.ReadMemStats(&before)
		r := newRange(b)
		fill(b, r, 50)
		runtime.GC()
		runtime.ReadMemStats(&after)
		b.ReportMetric(float64(after.HeapAlloc)-float64(before.HeapAlloc), "B/range")
		runtime.KeepAlive(r)
	}
}
