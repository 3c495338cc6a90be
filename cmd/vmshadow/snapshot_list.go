package main

import (
	"fmt"
	"io"

	"github.com/spf13/cobra"

	"github.com/vmshadow/vmshadow/internal/coord"
)

func newSnapshotListCmd(a *app) *cobra.Command {
	var f vmFlags
	cmd := &cobra.Command{
		Use:   "list (--qmp SOCKET | --xapi URL --vm NAME|UUID | --libvirt URI --vm NAME|UUID)",
		Short: "List the VM's snapshot sets",
		Args:  cobra.NoArgs,
		RunE: func(cmd *cobra.Command, args []string) error {
			s, err := f.session(cmd.Context(), a, false)
			if err != nil {
				return err
			}
			defer s.Close()
			sets, err := s.List(cmd.Context())
			if err != nil {
				return err
			}
			infos := []coord.Info{}
			for _, set := range sets {
				infos = append(infos, set.Info())
			}
			a.out.Summary(struct {
				VM   string       `json:"vm"`
				Sets []coord.Info `json:"sets"`
			}{s.VM().Name, infos}, func(w io.Writer) {
				if len(infos) == 0 {
					fmt.Fprintf(w, "no snapshot sets on %s\n", s.VM().Name)
				}
				for _, i := range infos {
					printSet(w, i)
				}
			})
			return nil
		},
	}
	f.addVM(cmd)
	return cmd
}
