{{/* Release-wide checks that values.schema.json cannot express. Included once (jobs.yaml); renders
     nothing, or fails with a message naming the values involved. ctx: root */}}
{{- define "quantcore.validate" -}}
{{- $root := . -}}
{{- $v := .Values -}}

{{- /* Run names and the final object names derived from them are unique. Names are cut with a
       hash suffix ("quantcore.truncName"), so a clash here means two equal names, not a cut. */ -}}
{{- $runNames := dict -}}
{{- $jobNames := dict -}}
{{- range $i, $run := $v.runs -}}
{{- if hasKey $runNames $run.name -}}
{{- fail (printf "runs[%d].name %q is used by another run: run names must be unique" $i $run.name) -}}
{{- end -}}
{{- $_ := set $runNames $run.name $i -}}
{{- $job := include "quantcore.jobName" (dict "root" $root "run" $run) -}}
{{- if hasKey $jobNames $job -}}
{{- fail (printf "runs[%d] (%s) and runs[%v] both get the Job name %q: rename one of them" $i $run.name (get $jobNames $job) $job) -}}
{{- end -}}
{{- $_ := set $jobNames $job $i -}}
{{- end -}}
{{- if and $v.sweep.enabled $v.rayQat.enabled -}}
{{- if eq (include "quantcore.rayJobName" (dict "root" $root "name" $v.sweep.name)) (include "quantcore.rayJobName" (dict "root" $root "name" $v.rayQat.name)) -}}
{{- fail (printf "rayQat.name and sweep.name are both %q: the two RayJobs need different names" $v.rayQat.name) -}}
{{- end -}}
{{- end -}}

{{- /* Data flow inside one release. All of a release's Jobs and RayJobs start at once, so one
       that reads what another writes would read before it was written (or a stale copy), and two
       that write the same `out` overwrite each other's reports. Neither is allowed: a calibration
       followed by its evaluation is one run of mode ptq; anything else goes into a later release. */ -}}
{{- $writers := list -}}
{{- $readers := list -}}
{{- range $i, $run := $v.runs -}}
{{- $who := printf "runs[%d] (%s)" $i $run.name -}}
{{- $writers = append $writers (dict "who" $who "field" "out" "uri" $run.out) -}}
{{- $refs := list -}}
{{- if kindIs "slice" $run.recipe }}{{ $refs = $run.recipe }}{{ else if $run.recipe }}{{ $refs = list $run.recipe }}{{ end -}}
{{- range $refs -}}
{{- if not (hasKey $v.recipes .) }}{{ $readers = append $readers (dict "who" $who "field" "recipe" "uri" .) }}{{ end -}}
{{- end -}}
{{- range $field := list "model" "init" "data" "evalData" -}}
{{- $uri := get $run $field -}}
{{- if and $uri (ne (toString $uri) "recipe") }}{{ $readers = append $readers (dict "who" $who "field" $field "uri" $uri) }}{{ end -}}
{{- end -}}
{{- end -}}
{{- if $v.rayQat.enabled -}}
{{- $writers = append $writers (dict "who" "rayQat" "field" "out" "uri" $v.rayQat.out) -}}
{{- range $field := list "model" "init" "data" "evalData" "recipe" -}}
{{- $uri := get $v.rayQat $field -}}
{{- if and $uri (ne (toString $uri) "recipe") (not (hasKey $v.recipes (toString $uri))) }}{{ $readers = append $readers (dict "who" "rayQat" "field" $field "uri" $uri) }}{{ end -}}
{{- end -}}
{{- end -}}
{{- if $v.sweep.enabled -}}
{{- $writers = append $writers (dict "who" "sweep" "field" "out" "uri" $v.sweep.out) -}}
{{- $cfg := default (dict) $v.sweep.config -}}
{{- $entries := list (dict "where" "config.defaults" "entry" (default (dict) $cfg.defaults)) -}}
{{- range $i, $r := (default (list) $cfg.runs) }}{{ $entries = append $entries (dict "where" (printf "config.runs[%d]" $i) "entry" $r) }}{{ end -}}
{{- range $entries -}}
{{- $where := .where -}}
{{- if kindIs "map" .entry -}}
{{- $entry := .entry -}}
{{- range $field := list "checkpoint" "calib_data" "eval_data" -}}
{{- $uri := get $entry $field -}}
{{- if kindIs "string" $uri }}{{ $readers = append $readers (dict "who" "sweep" "field" (printf "%s.%s" $where $field) "uri" $uri) }}{{ end -}}
{{- end -}}
{{- end -}}
{{- end -}}
{{- end -}}
{{- range $i, $w := $writers -}}
{{- $out := trimSuffix "/" (toString $w.uri) -}}
{{- range $j, $o := $writers -}}
{{- if and (lt $i $j) (eq $out (trimSuffix "/" (toString $o.uri))) -}}
{{- fail (printf "%s and %s both write to out %s: give each its own output prefix" $w.who $o.who $out) -}}
{{- end -}}
{{- end -}}
{{- range $r := $readers -}}
{{- $uri := toString $r.uri -}}
{{- if and (ne $r.who $w.who) (or (eq (trimSuffix "/" $uri) $out) (hasPrefix (printf "%s/" $out) $uri)) -}}
{{- fail (printf "%s.%s reads %s, which %s writes (out %s): the Jobs of one release start together, so it would read before the other has written. Calibrate and evaluate in one run of mode ptq, or install the reading run in a later release once %s has finished" $r.who $r.field $uri $w.who $out $w.who) -}}
{{- end -}}
{{- end -}}
{{- end -}}
{{- end -}}
