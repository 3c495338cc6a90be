package main

import (
	"context"
	"errors"
	"fmt"
	"io"
	"strings"

	"github.com/spf13/cobra"

	"github.com/vmshadow/vmshadow/internal/coord"
)

func newSnapshotDeleteCmd(a *app) *cobra.Command {
	var f vmFlags
	cmd := &cobra.Command{
		Use:   "delete (--qmp SOCKET | --xapi URL --vm NAME|UUID | --libvirt URI --vm NAME|UUID) SET_ID",
		Short: "Release a snapshot set: remove its exports, filters and scratch files (QEMU), or its snapshot (XAPI)",
		Args:  cobra.ExactArgs(1),
		RunE: func(cmd *cobra.Command, args []string) error {
			ss, err := f.sessions(cmd.Context(), a, true, false)
			if err != nil {
				return err
			}
			defer func() {
				for _, s := range ss {
					s.Close()
				}
			}()
			if len(ss) > 1 {
				return deleteGroupSet(cmd.Context(), a, ss, args[0])
			}
			set, err := ss[0].Delete(cmd.Context(), args[0])
			if err != nil {
				return err
			}
			a.out.Summary(struct {
				SetID   string `json:"set_id"`
				VM      string `json:"vm"`
				Deleted bool   `json:"deleted"`
			}{set.ID, set.VM, true}, func(w io.Writer) { fmt.Fprintf(w, "deleted snapshot set %s of %s\n", set.ID, set.VM) })
			return nil
		},
	}
	f.addVM(cmd)
	return cmd
}

// deleteGroupSet releases a set across several VMs (a group's), VM by VM;
// it goes on past a VM that fails, and fails naming it.
func deleteGroupSet(ctx context.Context, a *app, ss []*coord.Session, id string) error {
	var vms []string
	var errList []error
	for _, s := range ss {
		if _, err := s.Delete(ctx, id); err != nil {
			errList = append(errList, fmt.Errorf("VM %s: %w", s.VM().Name, err))
			continue
		}
		vms = append(vms, s.VM().Name)
	}
	if len(errList) > 0 {
		return errors.Join(errList...)
	}
	a.out.Summary(struct {
		SetID   string   `json:"set_id"`
		VMs     []string `json:"vms"`
		Deleted bool     `json:"deleted"`
	}{id, vms, true}, func(w io.Writer) { fmt.Fprintf(w, "deleted snapshot set %s of %s\n", id, strings.Join(vms, ", ")) })
	return nil
}
