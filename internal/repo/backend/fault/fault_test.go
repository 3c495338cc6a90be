package fault

import (
	"context"
	"errors"
	"testing"

	"github.com/vmshadow/vmshadow/internal/errs"
	"github.com/vmshadow/vmshadow/internal/repo/backend"
	"github.com/vmshadow/vmshadow/internal/repo/backend/backendtest"
	"github.com/vmshadow/vmshadow/internal/repo/backend/mem"
)

// With no rules the wrapper is a faithful backend.
func TestSuite(t *testing.T) {
	backendtest.Run(t, func(t *testing.T) backend.Backend { return New(mem.New()) })
}

func TestRules(t *testing.T) {
	ctx := context.Background()
	hd := func(n string) backend.Handle { return backend.Handle{Kind: backend.KindChunks, Name: n} }
	f := New(mem.New())
	f.Add(Rule{Op: OpPut, Kind: backend.KindChunks, Nth: 2, Mode: Fail})
	if err := f.Put(ctx, hd("a"), []byte("1")); err != nil {
		t.Fatal(err)
	}
	if err := f.Put(ctx, hd("b"), []byte("2")); !errors.Is(err, ErrInjected) {
		t.Fatalf("2nd put: %v", err)
	}
	if err := f.Put(ctx, hd("c"), []byte("3")); err != nil {
		t.Fatal(err)
	}
	if err := f.Put(ctx, backend.Handle{Kind: backend.KindIndexes, Name: "i"}, nil); err != nil {
		t.Fatal("rule for chunks hit an index:", err)
	}

	f.Reset()
	f.Add(Rule{Op: OpGet, Mode: Corrupt})
	d, err := f.Get(ctx, hd("a"), 0, -1)
	if err != nil || string(d) == "1" {
		t.Fatalf("corrupt get: %q %v", d, err)
	}
	f.Reset()
	f.Add(Rule{Op: OpPut, Mode: Truncate})
	f.Put(ctx, hd("t"), []byte("1234"))
	f.Reset()
	if d, _ := f.Get(ctx, hd("t"), 0, -1); string(d) != "12" {
		t.Fatalf("truncated put stored %q", d)
	}

	f.SetSpace(5)
	if err := f.Put(ctx, hd("s1"), []byte("1234")); err != nil {
		t.Fatal(err)
	}
	if err := f.Put(ctx, hd("s2"), []byte("12")); !errors.Is(err, errs.ErrNoSpace) {
		t.Fatalf("put over the space budget: %v", err)
	}
	if _, err := f.Stat(ctx, hd("s2")); !backend.IsNotExist(err) {
		t.Fatal("failed put stored a blob")
	}
	f.Reset()
	f.SetReadOnly(true)
	if err := f.Put(ctx, hd("r"), nil); !errors.Is(err, backend.ErrReadOnly) {
		t.Fatalf("read-only put: %v", err)
	}
	if err := f.Delete(ctx, hd("a")); !errors.Is(err, backend.ErrReadOnly) {
		t.Fatalf("read-only delete: %v", err)
	}
	if f.Calls(OpPut) != 8 {
		t.Errorf("Calls(put) = %d", f.Calls(OpPut))
	}
}
