package main

import (
	"fmt"
	"io"

	"github.com/spf13/cobra"
)

func newSnapshotDeleteCmd(a *app) *cobra.Command {
	var f vmFlags
	cmd := &cobra.Command{
		Use:   "delete (--qmp SOCKET | --xapi URL --vm NAME|UUID | --libvirt URI --vm NAME|UUID) SET_ID",
		Short: "Release a snapshot set: remove its exports, filters and scratch files (QEMU), or its snapshot (XAPI)",
		Args:  cobra.ExactArgs(1),
		RunE: func(cmd *cobra.Command, args []string) error {
			s, err := f.session(cmd.Context(), a, true)
			if err != nil {
				return err
			}
			defer s.Close()
			set, err := s.Delete(cmd.Context(), args[0])
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
