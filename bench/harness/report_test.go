package main

import (
	"strings"
	"testing"
)

func TestLVChecks(t *testing.T) {
	good := func() lvRound {
		return lvRound{
			Changed: 11 << 20,
			Base:    map[string]int64{"vmshadow-r-s1": 11 << 20, "virtnbdbackup.0": 11 << 20},
			After:   map[string]int64{"vmshadow-r-s2": 0, "virtnbdbackup.1": 0},
			Domain:  "d", Vmshadow: "d", Virtnbd: "d",
		}
	}
	cases := []struct {
		name    string
		change  func(*lvRound)
		haveVNB bool
		cpOK    bool
		same    int
		want    string
	}{
		{"all well", func(*lvRound) {}, true, true, 1, "round 1: change 11.0, vmshadow 11.0, virtnbdbackup 11.0"},
		{"vmshadow's checkpoint marks more than the change", func(r *lvRound) { r.Base["vmshadow-r-s1"] = 12 << 20 }, true, false, 1, "vmshadow 12.0"},
		{"virtnbdbackup's marks less", func(r *lvRound) { r.Base["virtnbdbackup.0"] = 10 << 20 }, true, false, 1, "virtnbdbackup 10.0"},
		{"a base moved through the other tool's step", func(r *lvRound) { r.Moved = []string{"virtnbdbackup.0: 11 MiB -> 12 MiB after x"} }, true, false, 1, "moved: "},
		{"written after the instants", func(r *lvRound) { r.After["virtnbdbackup.1"] = 64 << 10 }, true, false, 1, "virtnbdbackup.1 marks 0.1 after the round"},
		{"a tool's checkpoint missing", func(r *lvRound) { delete(r.Base, "virtnbdbackup.0") }, true, false, 1, ""},
		{"virtnbdrestore differs", func(r *lvRound) { r.Virtnbd = "x" }, true, true, 0, ""},
		{"vmshadow's restore differs", func(r *lvRound) { r.Vmshadow = "x" }, true, true, 0, ""},
		{"no domain checksum", func(r *lvRound) { r.Domain, r.Vmshadow, r.Virtnbd = "", "", "" }, true, true, 0, ""},
		{"virtnbdbackup left out", func(r *lvRound) {
			delete(r.Base, "virtnbdbackup.0")
			delete(r.After, "virtnbdbackup.1")
			r.Virtnbd = ""
		}, false, true, 1, "round 1: change 11.0, vmshadow 11.0"},
	}
	for _, c := range cases {
		r := good()
		c.change(&r)
		cpOK, same, figs := lvChecks([]lvRound{r}, c.haveVNB)
		if cpOK != c.cpOK || same != c.same {
			t.Errorf("%s: cpOK %v same %d, want %v %d (%v)", c.name, cpOK, same, c.cpOK, c.same, figs)
		}
		if len(figs) != 1 || !strings.Contains(figs[0], c.want) {
			t.Errorf("%s: figures %q, want them to contain %q", c.name, figs, c.want)
		}
	}
	if cpOK, same, _ := lvChecks(nil, true); cpOK || same != 0 {
		t.Errorf("no rounds: cpOK %v same %d, want false 0", cpOK, same)
	}
}
