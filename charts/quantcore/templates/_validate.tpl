{{/* Release-wide checks that values.schema.json cannot express, or only with messages that do not
     name the fix. Renders nothing, or fails with a message naming the values involved. Every
     template file that can fail by itself (jobs, qat-job, rayjob, rayjob-qat, tests/) includes
     it first: Helm renders the files in an order of its own and reports the first failure, which
     should be this check's message, not a template tripping over the same values. ctx: root */}}
{{- define "quantcore.validate" -}}
{{- $root := . -}}
{{- $v := .Values -}}

{{- /* The image: repository, tag and digest are separate values (one knob each). */ -}}
{{- $img := $v.image -}}
{{- if contains "@" $img.repository -}}
{{- $parts := splitn "@" 2 $img.repository -}}
{{- fail (printf "image.repository %q contains a digest: split it into image.repository: %s and image.digest: %s (the digest then selects the image; image.tag only documents it)" $img.repository $parts._0 $parts._1) -}}
{{- end -}}
{{- if regexMatch ":[^/]*$" $img.repository -}}
{{- $at := regexFind ":[^/]*$" $img.repository -}}
{{- fail (printf "image.repository %q contains a tag: split it into image.repository: %s and image.tag: %q" $img.repository (trimSuffix $at $img.repository) (trimPrefix ":" $at)) -}}
{{- end -}}
{{- if not (regexMatch "^[a-z0-9]+([._-][a-z0-9]+)*(:[0-9]+)?(/[a-z0-9]+([._-][a-z0-9]+)*)*$" $img.repository) -}}
{{- fail (printf "image.repository %q is not an image repository: lowercase registry host (optional :port) and path, e.g. registry.example.com/ml/quantcore" $img.repository) -}}
{{- end -}}
{{- if eq $img.tag "latest" -}}
{{- fail (printf "image.tag: latest is refused: it moves, so a retried or rescheduled pod could run another image than the first. Set image.tag to a release tag (e.g. 0.1.0)%s" (ternary "; with image.digest set, the digest selects the image and the tag only documents it: use the tag the digest was pushed as" "" (not (empty $img.digest)))) -}}
{{- end -}}

{{- /* The ServiceAccount: never `default` with the S3 Secret Role (rbac.yaml) bound to it. */ -}}
{{- $sa := $v.serviceAccount -}}
{{- if and $sa.create (eq $sa.name "default") -}}
{{- fail "serviceAccount.name: default is the namespace's own `default` ServiceAccount, which Kubernetes creates and every pod without an account of its own uses: the chart cannot create it, and binding the S3 Secret Role to it would let all those pods read the Secret. Choose another name, or leave serviceAccount.name empty for the release's own account" -}}
{{- end -}}
{{- if and (not $sa.create) $sa.annotations -}}
{{- fail (printf "serviceAccount.annotations apply only to a ServiceAccount the chart creates (serviceAccount.create: true); with create: false the pods use the existing account %q: annotate it there (kubectl annotate serviceaccount ...) and remove serviceAccount.annotations" (include "quantcore.serviceAccountName" $root)) -}}
{{- end -}}

{{- if and $v.rbac.create $v.s3.secretName (eq (include "quantcore.serviceAccountName" $root) "default") -}}
{{- $why := "every pod without an account of its own uses that account, so all of them could read the Secret" -}}
{{- if $sa.name -}}
{{- fail (printf "serviceAccount.name: default is the namespace's `default` ServiceAccount, and rbac.create would bind the S3 Secret Role to it: %s. Set serviceAccount.name to a dedicated existing account, or serviceAccount.create: true with serviceAccount.name empty (the release's own account), or rbac.create: false" $why) -}}
{{- else -}}
{{- fail (printf "serviceAccount.create is false and serviceAccount.name is empty: the pods would run as the namespace's `default` ServiceAccount, and rbac.create would bind the S3 Secret Role to it: %s. Set serviceAccount.name to a dedicated existing account, or serviceAccount.create: true, or rbac.create: false" $why) -}}
{{- end -}}
{{- end -}}

{{- /* Keys of every label, annotation and node-selector map. */ -}}
{{- $maps := list
    (dict "m" $v.labels "where" "labels" "kind" "label")
    (dict "m" $v.podLabels "where" "podLabels" "kind" "label")
    (dict "m" $v.podAnnotations "where" "podAnnotations" "kind" "annotation")
    (dict "m" $sa.annotations "where" "serviceAccount.annotations" "kind" "annotation")
    (dict "m" $v.gpu.nodeSelector "where" "gpu.nodeSelector" "kind" "node selector")
    (dict "m" $v.monitoring.podMonitor.labels "where" "monitoring.podMonitor.labels" "kind" "label") -}}
{{- range $key, $d := dict "defaults" $v.defaults "sweep" $v.sweep "rayQat" $v.rayQat -}}
{{- $maps = append $maps (dict "m" $d.labels "where" (printf "%s.labels" $key) "kind" "label") -}}
{{- $maps = append $maps (dict "m" $d.podAnnotations "where" (printf "%s.podAnnotations" $key) "kind" "annotation") -}}
{{- $maps = append $maps (dict "m" $d.nodeSelector "where" (printf "%s.nodeSelector" $key) "kind" "node selector") -}}
{{- end -}}
{{- range $key := list "sweep" "rayQat" -}}
{{- range $g := list "head" "workers" -}}
{{- $maps = append $maps (dict "m" (get (get $v $key) $g).nodeSelector "where" (printf "%s.%s.nodeSelector" $key $g) "kind" "node selector") -}}
{{- end -}}
{{- end -}}
{{- range $i, $run := $v.runs -}}
{{- $maps = append $maps (dict "m" $run.labels "where" (printf "runs[%d].labels" $i) "kind" "label") -}}
{{- $maps = append $maps (dict "m" $run.podAnnotations "where" (printf "runs[%d].podAnnotations" $i) "kind" "annotation") -}}
{{- $maps = append $maps (dict "m" $run.nodeSelector "where" (printf "runs[%d].nodeSelector" $i) "kind" "node selector") -}}
{{- end -}}
{{- range $maps }}{{ include "quantcore.checkKeys" . }}{{ end -}}
{{- range $name, $_ := $v.recipes -}}
{{- if not (and (regexMatch "^[A-Za-z0-9_][A-Za-z0-9_.-]*$" $name) (le (len $name) 200)) -}}
{{- fail (printf "recipes: %q is not a valid inline recipe name: at most 200 letters, digits, '_', '.' and '-' (it becomes the file /etc/quantcore/recipes/<name>.yaml and the value of a run's recipe)" $name) -}}
{{- end -}}
{{- end -}}

{{- /* Which run keys each mode uses. A key a mode ignores is refused rather than dropped. */ -}}
{{- $qatOnly := list "init" "nnodes" "nprocPerNode" "epochs" "maxSteps" "evalLimit" "maxRestarts" "terminationGracePeriodSeconds" "rdzvPort" -}}
{{- $loaderModes := list "calibrate" "evaluate" "ptq" "qat" -}}
{{- $modesOf := dict "evalData" (list "ptq" "qat") "evalSplit" (list "ptq" "qat") "limit" (list "evaluate" "ptq" "export") "recipe" (list "calibrate" "ptq" "qat") "format" (list "export") "opset" (list "export") "batchSize" (list "evaluate" "ptq" "qat") "layout" $loaderModes "workers" $loaderModes "skipBad" (append $loaderModes "export") -}}
{{- range $q := $qatOnly }}{{ $_ := set $modesOf $q (list "qat") }}{{ end -}}
{{- $hints := dict
    "calibrate" "calibrate evaluates nothing: remove it, or use mode ptq (calibrate, then evaluate, in one Job)"
    "evaluate" "evaluate reads the recipe from the checkpoint and the images from data/split: remove it"
    "limit-qat" "qat evaluates with evalLimit: use that instead"
    "export" "export reads the recipe from the checkpoint and checks its ONNX graph in onnxruntime on CPU, without a DataLoader: remove it"
    "format" "only export runs write deployment formats: remove it, or add a run of mode export that reads this run's checkpoint in a later release" -}}
{{- range $i, $run := $v.runs -}}
{{- $who := printf "runs[%d] (%s)" $i $run.name -}}
{{- range $key, $modes := $modesOf -}}
{{- if and (hasKey $run $key) (not (has $run.mode $modes)) -}}
{{- $hint := "only qat runs use it: remove it, or set mode: qat" -}}
{{- if not (has $key $qatOnly) }}{{ $hint = get $hints $run.mode }}{{ end -}}
{{- if has $key (list "format" "opset") }}{{ $hint = get $hints "format" }}{{ end -}}
{{- if and (eq $key "limit") (eq $run.mode "qat") }}{{ $hint = get $hints "limit-qat" }}{{ end -}}
{{- fail (printf "%s.%s does not apply to mode %s (only to %s): %s" $who $key $run.mode (join ", " $modes) $hint) -}}
{{- end -}}
{{- end -}}
{{- if and (has $run.mode (get $modesOf "recipe")) (not $run.recipe) -}}
{{- fail (printf "%s.recipe is required for mode %s: a built-in recipe name, a key of `recipes`, an absolute .yaml path or an s3:// URI%s" $who $run.mode (ternary "" ", or a list of them" (eq $run.mode "qat"))) -}}
{{- end -}}
{{- if and (eq $run.mode "qat") (kindIs "slice" $run.recipe) -}}
{{- fail (printf "%s.recipe: qat trains one recipe, got a list of %d: give each recipe its own qat run" $who (len $run.recipe)) -}}
{{- end -}}
{{- if eq $run.mode "qat" }}{{ include "quantcore.checkQatRecipe" (dict "who" $who "ref" $run.recipe "recipes" $v.recipes) }}{{ end -}}
{{- if and (has $run.mode (list "evaluate" "export")) (eq (toString $run.model) "recipe") -}}
{{- fail (printf "%s.model: mode %s needs the URI of a calibrated checkpoint (…/model.qc.pt, written by calibrate, ptq or qat), not `recipe`" $who $run.mode) -}}
{{- end -}}
{{- if eq $run.mode "export" -}}
{{- range $key := list "limit" "split" "skipBad" -}}
{{- if and (not $run.data) (hasKey $run $key) -}}
{{- fail (printf "%s.%s: export checks the ONNX graph on the images of `data` (--check-data); without data there are no images to limit, split or skip: set data, or remove %s" $who $key $key) -}}
{{- end -}}
{{- end -}}
{{- if gt (int (default 0 $run.gpus)) 0 -}}
{{- fail (printf "%s.gpus: export runs on CPU (ONNX export and the onnxruntime check; TensorRT engines are built on the deployment target): set gpus: 0 or remove it" $who) -}}
{{- end -}}
{{- end -}}
{{- end -}}

{{- /* The monitoring settings must have something to act on. */ -}}
{{- if and $v.monitoring.podMonitor.enabled (not (or $v.sweep.enabled $v.rayQat.enabled)) -}}
{{- fail "monitoring.podMonitor.enabled is true, but this release has no Ray pods to scrape (sweep and rayQat are disabled, and the Jobs serve no metrics): set monitoring.podMonitor.enabled: false for it" -}}
{{- end -}}

{{- /* Every name the chart renders, and those KubeRay derives from a RayJob's, must be valid for
       their kind (the chart cuts them to length; the characters come from the release name). */ -}}
{{- $full := include "quantcore.fullname" $root -}}
{{- include "quantcore.checkName" (dict "root" $root "name" $full "rule" "subdomain" "max" 40 "what" "the ConfigMap, NetworkPolicy, Role and PodMonitor name prefix" "why" "object names") -}}
{{- if $sa.create -}}
{{- include "quantcore.checkName" (dict "root" $root "name" (include "quantcore.serviceAccountName" $root) "rule" "subdomain" "max" 253 "what" "the ServiceAccount name" "why" "object names") -}}
{{- end -}}
{{- range $i, $run := $v.runs -}}
{{- $job := include "quantcore.jobName" (dict "root" $root "run" $run) -}}
{{- if eq $run.mode "qat" -}}
{{- include "quantcore.checkName" (dict "root" $root "name" $job "rule" "dns1035" "max" 52 "what" (printf "the qat Job and headless Service name of runs[%d] (%s)" $i $run.name) "why" "a Service name is a DNS-1035 label, and the pods' hostnames and subdomain, <job>-<index>.<job>, are DNS-1123 labels") -}}
{{- else -}}
{{- include "quantcore.checkName" (dict "root" $root "name" $job "rule" "subdomain" "max" 63 "what" (printf "the Job name of runs[%d] (%s)" $i $run.name) "why" "the Job controller puts it into the job-name label of the pods") -}}
{{- end -}}
{{- end -}}
{{- range $key := list "sweep" "rayQat" -}}
{{- $cfg := get $v $key -}}
{{- if $cfg.enabled -}}
{{- include "quantcore.checkName" (dict "root" $root "name" (include "quantcore.rayJobName" (dict "root" $root "name" $cfg.name)) "rule" "dns1035" "max" 47 "what" (printf "the RayJob name of %s" $key) "why" "KubeRay requires it and derives the RayCluster <name>-<5 characters> and its head Service <cluster>-head-svc from it") -}}
{{- end -}}
{{- end -}}
{{- if $v.tests.enabled -}}
{{- include "quantcore.checkName" (dict "root" $root "name" (include "quantcore.testPodName" (dict "root" $root "name" "image")) "rule" "subdomain" "max" 63 "what" "the helm test pod name" "why" "pod names become the pods' hostnames") -}}
{{- end -}}

{{- /* Volumes and local paths: a local path must be on a PersistentVolumeClaim mounted into the
       pods that use it (see "quantcore.checkLocalPath"). One mount path means one claim in the
       whole release, so that a path names the same files in every pod (and the helm test pod
       can mount them all). */ -}}
{{- $global := default (list) $v.volumes -}}
{{- include "quantcore.checkVolumes" (dict "vols" $global "where" "volumes") -}}
{{- $recipeFiles := list -}}
{{- range $name, $_ := $v.recipes }}{{ $recipeFiles = append $recipeFiles (printf "/etc/quantcore/recipes/%s.yaml" $name) }}{{ end -}}
{{- $claimAt := dict -}}
{{- $workloads := list -}}
{{- range $i, $run := $v.runs -}}
{{- $where := printf "runs[%d]" $i -}}
{{- $vols := concat $global (default (list) $run.volumes) -}}
{{- $paths := list -}}
{{- $refs := ternary $run.recipe (list $run.recipe) (kindIs "slice" $run.recipe) -}}
{{- range $refs }}{{ $paths = append $paths (dict "field" "recipe" "uri" .) }}{{ end -}}
{{- range $f := list "model" "init" "data" "evalData" }}{{ $paths = append $paths (dict "field" $f "uri" (get $run $f)) }}{{ end -}}
{{- $paths = append $paths (dict "field" "out" "uri" $run.out "write" true) -}}
{{- $workloads = append $workloads (dict "who" (printf "%s (%s)" $where $run.name) "vols" $vols "paths" $paths "hint" (printf "volumes (every pod) or %s.volumes" $where) "volWhere" (printf "%s (%s): volumes + %s.volumes" $where $run.name $where)) -}}
{{- end -}}
{{- if $v.rayQat.enabled -}}
{{- $q := $v.rayQat -}}
{{- include "quantcore.checkQatRecipe" (dict "who" "rayQat" "ref" $q.recipe "recipes" $v.recipes) -}}
{{- $paths := list (dict "field" "out" "uri" $q.out "write" true) (dict "field" "storagePath" "uri" $q.storagePath "write" true) -}}
{{- range $f := list "recipe" "model" "init" "data" "evalData" }}{{ $paths = append $paths (dict "field" $f "uri" (get $q $f)) }}{{ end -}}
{{- $workloads = append $workloads (dict "who" "rayQat" "vols" (concat $global (default (list) $q.volumes)) "paths" $paths "hint" "volumes (every pod) or rayQat.volumes" "volWhere" "volumes + rayQat.volumes") -}}
{{- end -}}
{{- if $v.sweep.enabled -}}
{{- $sw := $v.sweep -}}
{{- $paths := list (dict "field" "out" "uri" $sw.out "write" true) -}}
{{- $cfg := default (dict) $sw.config -}}
{{- $entries := list (dict "where" "config.defaults" "entry" (default (dict) $cfg.defaults)) -}}
{{- if kindIs "slice" $cfg.runs }}{{ range $i, $r := $cfg.runs }}{{ $entries = append $entries (dict "where" (printf "config.runs[%d]" $i) "entry" $r) }}{{ end }}{{ end -}}
{{- range $entries -}}
{{- $where := .where -}}
{{- if kindIs "map" .entry -}}
{{- $entry := .entry -}}
{{- range $f := list "checkpoint" "calib_data" "eval_data" "recipe" }}{{ if kindIs "string" (get $entry $f) }}{{ $paths = append $paths (dict "field" (printf "%s.%s" $where $f) "uri" (get $entry $f)) }}{{ end }}{{ end -}}
{{- if kindIs "slice" $entry.recipes }}{{ range $entry.recipes }}{{ if kindIs "string" . }}{{ $paths = append $paths (dict "field" (printf "%s.recipes" $where) "uri" .) }}{{ end }}{{ end }}{{ end -}}
{{- if kindIs "string" $entry.cache_dir }}{{ $paths = append $paths (dict "field" (printf "%s.cache_dir" $where) "uri" $entry.cache_dir "write" true) }}{{ end -}}
{{- end -}}
{{- end -}}
{{- $workloads = append $workloads (dict "who" "sweep" "vols" (concat $global (default (list) $sw.volumes)) "paths" $paths "hint" "volumes (every pod) or sweep.volumes" "volWhere" "volumes + sweep.volumes") -}}
{{- end -}}
{{- range $w := $workloads -}}
{{- include "quantcore.checkVolumes" (dict "vols" $w.vols "where" $w.volWhere) -}}
{{- range $w.vols -}}
{{- if and (hasKey $claimAt .mountPath) (ne (get $claimAt .mountPath) .claimName) -}}
{{- fail (printf "%s mounts claim %s at %s, where another workload of the release mounts claim %s: one mount path, one claim per release (a path then names the same files in every pod)" $w.who .claimName .mountPath (get $claimAt .mountPath)) -}}
{{- end -}}
{{- $_ := set $claimAt .mountPath .claimName -}}
{{- end -}}
{{- range $p := $w.paths -}}
{{- $roots := ternary (concat $recipeFiles (list "/cache" "/tmp")) $recipeFiles (hasSuffix "cache_dir" $p.field) -}}
{{- /* recipes are built-in names or the chart's recipe files too; model may be "recipe" */ -}}
{{- $named := or (hasSuffix "recipe" $p.field) (hasSuffix "recipes" $p.field) (and (hasSuffix "model" $p.field) (eq (toString $p.uri) "recipe")) -}}
{{- include "quantcore.checkLocalPath" (dict "uri" $p.uri "field" (printf "%s.%s" $w.who $p.field) "write" (default false $p.write) "vols" $w.vols "roots" $roots "hint" $w.hint "named" $named) -}}
{{- end -}}
{{- end -}}

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
{{- /* a sweep's runs run side by side, each writing <out>/<name>/: one reading another's races it */ -}}
{{- if kindIs "string" $uri -}}
{{- range $run := (default (list) $cfg.runs) -}}
{{- if and (kindIs "map" $run) (kindIs "string" $run.name) -}}
{{- $its := printf "%s/%s" (trimSuffix "/" (toString $v.sweep.out)) $run.name -}}
{{- if or (eq (trimSuffix "/" (toString $uri)) $its) (hasPrefix (printf "%s/" $its) (toString $uri)) -}}
{{- fail (printf "sweep.%s.%s reads %s, which sweep run %s writes (%s/): the sweep's runs run side by side, so it would read before that run has written. Read it in a later sweep or release, once run %s has finished" $where $field (toString $uri) $run.name $its $run.name) -}}
{{- end -}}
{{- end -}}
{{- end -}}
{{- end -}}
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

{{/* A QAT workload's inline recipe (a key of `recipes`) must have a qat: section: the pod would
     stop at start on "no qat: section" after the gang of GPU pods was scheduled (`qat: {}` is one: every
     field has a default). Built-in names and
     files are read in the pod (helm test loads them). Renders nothing. ctx: dict who, ref, recipes */}}
{{- define "quantcore.checkQatRecipe" -}}
{{- if and (kindIs "string" .ref) (hasKey .recipes .ref) -}}
{{- $r := get .recipes .ref -}}
{{- if and (kindIs "map" $r) (or (not (hasKey $r "qat")) (kindIs "invalid" (get $r "qat"))) -}}
{{- fail (printf "%s.recipe: inline recipe %q (recipes.%s) has no qat: section, which QAT trains with (epochs, optimizer, distillation; README \"Quantization-aware training\"): add one, or use a recipe that has it" .who .ref .ref) -}}
{{- end -}}
{{- end -}}
{{- end -}}
