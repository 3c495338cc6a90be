package server

import (
	"context"
	"encoding/json"
	"fmt"
	"net/http/httptest"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/vmshadow/vmshadow/internal/server/api"
	"github.com/vmshadow/vmshadow/internal/server/api/apitest"
	"github.com/vmshadow/vmshadow/internal/server/state"
	"github.com/vmshadow/vmshadow/internal/xapitest"
)

// TestXAPISelection: a job's vms entries for a XenServer pool match a
// VM's UUID exactly (in any case) besides name-labels and globs. Two VMs
// sharing a name-label are each named after the label and the first 8
// hex digits of their UUID, so their chains never mix (each backs up its
// own disk, full then incremental); a plain name that picks both is
// refused naming both UUIDs (LABEL-UUID when LABEL-UUID8 is another VM's
// label). The selection preview agrees with the runs.
func TestXAPISelection(t *testing.T) {
	pool := xapitest.New(t, xapitest.Options{})
	db, _ := pool.AddVM("db", true, 2<<20)
	appA, _ := pool.AddVM("app", true, 3<<20)
	appB, _ := pool.AddVM("app", true, 5<<20)
	pool.AddVM("web", true, 1<<20)
	before := pool.Dump()
	nameA, nameB := "app-"+appA[:8], "app-"+appB[:8]
	size := map[string]int64{"db": 2 << 20, nameA: 3 << 20, nameB: 5 << 20}
	t.Setenv("VMSHADOW_TEST_POOL_PW", pool.Password)
	g := newRigConns(t, nil, fmt.Sprintf(`  pool:
    type: xapi
    url: %s
    user: %s
    password_env: VMSHADOW_TEST_POOL_PW
    ca: %s
`, pool.URL, pool.User, pool.CAFile), fmt.Sprintf(`  - {name: byuuid, type: backup, repository: main, vms: [{connection: pool, vms: [%q]}]}
  - {name: apps, type: backup, repository: main, vms: [{connection: pool, vms: ["ap*"]}], concurrency: {per_job: 2}}
  - {name: plain, type: backup, repository: main, vms: [{connection: pool, vms: ["app"]}]}
`, strings.ToUpper(db)))
	ctx := context.Background()
	if err := g.s.Start(ctx); err != nil {
		t.Fatal(err)
	}
	for job, want := range map[string][]string{"byuuid": {"db"}, "apps": {nameA, nameB}, "plain": {}} {
		j, err := g.s.Job(ctx, job)
		if err != nil {
			t.Fatal(err)
		}
		slices.Sort(want)
		if got := slices.Sorted(slices.Values(j.VMs)); !slices.Equal(got, want) {
			t.Errorf("job %s selects %v, want %v", job, got, want)
		}
	}

	// The preview: the same names, a VM picked twice (by UUID and glob)
	// once, the ambiguous name refused naming both UUIDs.
	// Through the API the web page calls, its answer valid against the
	// OpenAPI document.
	tok, err := g.s.DB().CreateToken(ctx, "viewer", state.Viewer, time.Now())
	if err != nil {
		t.Fatal(err)
	}
	body := fmt.Sprintf(`{"vms": [{"connection": "pool", "vms": [%q, %q]}, {"connection": "pool", "vms": ["app*"]}]}`, appB, db)
	req := httptest.NewRequest("POST", "/api/v1/selection-preview", strings.NewReader(body))
	req.Header.Set("Authorization", "Bearer "+tok)
	req.Header.Set("Content-Type", "application/json")
	rec := httptest.NewRecorder()
	api.New(g.s, api.Options{}).ServeHTTP(rec, req)
	apitest.ValidateRecorder(t, apitest.Doc(t), "POST", "/api/v1/selection-preview", rec)
	var sp *api.SelectionPreview
	if err := json.Unmarshal(rec.Body.Bytes(), &sp); err != nil || rec.Code != 200 {
		t.Fatalf("selection preview: %d %v: %s", rec.Code, err, rec.Body)
	}
	var got []string
	for _, v := range sp.VMs {
		got = append(got, v.Name+"/"+v.Connection+"/"+v.UUID)
	}
	slices.Sort(got)
	want := []string{nameA + "/pool/" + appA, nameB + "/pool/" + appB, "db/pool/" + db}
	slices.Sort(want)
	if !slices.Equal(got, want) || len(sp.Problems) != 0 {
		t.Errorf("selection preview: %v %v, want %v", got, sp.Problems, want)
	}
	sp, err = g.s.SelectionPreview(ctx, []api.VMSelector{{Connection: "pool", VMs: []string{"app"}}})
	if err != nil {
		t.Fatal(err)
	}
	if len(sp.VMs) != 0 || len(sp.Problems) != 1 || !strings.Contains(sp.Problems[0], "2 VMs of the pool are named \"app\"") ||
		!strings.Contains(sp.Problems[0], appA) || !strings.Contains(sp.Problems[0], appB) || !strings.Contains(sp.Problems[0], "select one by its UUID") {
		t.Errorf("preview of an ambiguous name: %+v", sp)
	}

	// Runs: the VM selected by UUID, then each app twice (full, then
	// incremental on its own chain).
	run := func(job string, mode string, names ...string) []state.LogLine {
		t.Helper()
		r, err := g.s.RunJob(ctx, job)
		if err != nil {
			t.Fatal(err)
		}
		end, vms := g.waitRun(t, r.ID)
		var got []string
		for _, v := range vms {
			if v.Status != state.Succeeded || v.Mode != mode {
				t.Errorf("job %s: VM %+v, want %s", job, v, mode)
			}
			got = append(got, v.VM)
		}
		slices.Sort(got)
		slices.Sort(names)
		if end.Status != state.Succeeded || !slices.Equal(got, names) {
			log, _ := g.s.RunLog(ctx, r.ID, 0, 0)
			t.Fatalf("job %s: %+v backed up %v, want %v\n%v", job, end, got, names, log)
		}
		log, err := g.s.RunLog(ctx, r.ID, 0, 0)
		if err != nil {
			t.Fatal(err)
		}
		return log
	}
	run("byuuid", "full", "db")
	log := run("apps", "full", nameA, nameB)
	if !hasLine(log, "VM "+appB+" is named "+nameB+" in the repository: 2 VMs of the pool") {
		t.Errorf("the run's log does not tell why %s is named so: %+v", appB, log)
	}
	run("apps", "incremental", nameA, nameB)
	per := map[string]int{}
	for _, b := range g.backups(t, "main") {
		if b.Source != "xapi" || len(b.Disks) != 1 || b.Disks[0].Size != size[b.VM] {
			t.Errorf("backup %s of %s: source %s, disks %+v, want one of %d bytes", b.ID.Short(), b.VM, b.Source, b.Disks, size[b.VM])
		}
		per[b.VM]++
	}
	if per["db"] != 1 || per[nameA] != 2 || per[nameB] != 2 || len(per) != 3 {
		t.Errorf("backups per VM: %v", per)
	}
	// The VM list shows each VM under its own name.
	all, err := g.s.VMs(ctx)
	if err != nil {
		t.Fatal(err)
	}
	status := map[string]string{}
	for _, v := range all {
		status[v.Name] = v.Status + "/" + v.Connection
	}
	if len(status) != 4 || status[nameA] != "fresh/pool" || status[nameB] != "fresh/pool" || status["db"] != "fresh/pool" || status["web"] != "never/pool" {
		t.Errorf("VMs: %v", status)
	}
	r, err := g.s.RunJob(ctx, "plain")
	if err != nil {
		t.Fatal(err)
	}
	if end, _ := g.waitRun(t, r.ID); end.Status != state.Failed || !strings.Contains(end.Error, appA) || !strings.Contains(end.Error, appB) {
		t.Errorf("job naming a shared name-label: %+v", end)
	}
	pool.CheckAsBefore(t, before, xapitest.Expect{Checkpoints: true})

	// A VM labelled as another's LABEL-UUID8 name keeps its label; that
	// other VM takes its whole UUID. A label made a 64-character
	// repository name keeps its UUID suffix.
	taken, _ := pool.AddVM(nameA, false, 1<<20)
	long := strings.Repeat("l", 70)
	l1, _ := pool.AddVM(long, false, 1<<20)
	l2, _ := pool.AddVM(long, false, 1<<20)
	sp, err = g.s.SelectionPreview(ctx, []api.VMSelector{{Connection: "pool", VMs: []string{"ap*", "l*"}}})
	if err != nil {
		t.Fatal(err)
	}
	got = got[:0]
	for _, v := range sp.VMs {
		got = append(got, v.Name+"/"+v.UUID)
	}
	slices.Sort(got)
	want = []string{"app-" + appA + "/" + appA, nameB + "/" + appB, nameA + "/" + taken,
		long[:64] + "-" + l1[:8] + "/" + l1, long[:64] + "-" + l2[:8] + "/" + l2}
	slices.Sort(want)
	if !slices.Equal(got, want) || len(sp.Problems) != 0 {
		t.Errorf("selection preview: %v %v, want %v", got, sp.Problems, want)
	}
}
