{{/* Names ------------------------------------------------------------------------------------- */}}
{{/* A name cut to at most .max characters that stays unique: the name itself when it fits, else
     its first max-9 characters, "-" and the first 8 hex digits of the sha256 of the whole name, so
     two long names that share a prefix never end up equal. ctx: dict name max */}}
{{- define "quantcore.truncName" -}}
{{- if le (len .name) (int .max) -}}
{{- .name -}}
{{- else -}}
{{- printf "%s-%s" (regexReplaceAll "[-.]+$" (.name | trunc (int (sub .max 9))) "") (.name | sha256sum | trunc 8) -}}
{{- end -}}
{{- end -}}

{{/* "<prefix>-<suffix>" in at most .max characters, unique like "quantcore.truncName", but cut so
     that the suffix (a run or block name) stays readable: the prefix (the release's full name)
     gives way first, down to 12 characters. Long: "<prefix part>-<suffix part>-<8 hex of the
     sha256 of the whole name>". ctx: dict prefix, suffix, max */}}
{{- define "quantcore.joinName" -}}
{{- $full := printf "%s-%s" .prefix .suffix -}}
{{- if le (len $full) (int .max) -}}
{{- $full -}}
{{- else -}}
{{- $room := sub (sub (int .max) 9) 1 -}}{{/* 9: "-" + 8 hex digits; 1: the "-" between the parts */}}
{{- $keep := min (len .suffix) (sub $room (min (len .prefix) 12)) -}}
{{- $head := regexReplaceAll "[-.]+$" (trunc (int (sub $room $keep)) .prefix) "" -}}
{{- $tail := regexReplaceAll "[-.]+$" (trunc (int $keep) .suffix) "" -}}
{{- printf "%s-%s-%s" $head $tail ($full | sha256sum | trunc 8) -}}
{{- end -}}
{{- end -}}

{{- define "quantcore.name" -}}
{{- include "quantcore.truncName" (dict "name" (default .Chart.Name .Values.nameOverride) "max" 40) -}}
{{- end -}}

{{- define "quantcore.fullname" -}}
{{- if .Values.fullnameOverride -}}
{{- include "quantcore.truncName" (dict "name" .Values.fullnameOverride "max" 40) -}}
{{- else -}}
{{- $name := default .Chart.Name .Values.nameOverride -}}
{{- if contains $name .Release.Name -}}
{{- include "quantcore.truncName" (dict "name" .Release.Name "max" 40) -}}
{{- else -}}
{{- include "quantcore.truncName" (dict "name" (printf "%s-%s" .Release.Name $name) "max" 40) -}}
{{- end -}}
{{- end -}}
{{- end -}}

{{/* The ServiceAccount of every pod. With serviceAccount.create: false and no name, the
     namespace's `default` account (rbac.yaml refuses to bind a Role to it). */}}
{{- define "quantcore.serviceAccountName" -}}
{{- if .Values.serviceAccount.create -}}
{{- default (include "quantcore.fullname" .) .Values.serviceAccount.name -}}
{{- else -}}
{{- default "default" .Values.serviceAccount.name -}}
{{- end -}}
{{- end -}}

{{/* The Job name of a run, at most 63 characters (the Job controller puts it into a label). qat
     Jobs get at most 52: their pods are named <job>-<index> and their headless Service shares the
     Job's name. ctx: dict root, run */}}
{{- define "quantcore.jobName" -}}
{{- $max := ternary 52 63 (eq .run.mode "qat") -}}
{{- include "quantcore.joinName" (dict "prefix" (include "quantcore.fullname" .root) "suffix" .run.name "max" $max) -}}
{{- end -}}

{{/* The name of a RayJob, at most 47 characters: KubeRay derives longer names from it (RayCluster
     <name>-<5 chars>, head Service <cluster>-head-svc) and rejects longer RayJob names.
     ctx: dict root, name (the block's `name`) */}}
{{- define "quantcore.rayJobName" -}}
{{- include "quantcore.joinName" (dict "prefix" (include "quantcore.fullname" .root) "suffix" .name "max" 47) -}}
{{- end -}}

{{/* The name of a `helm test` pod. ctx: dict root, name (its suffix) */}}
{{- define "quantcore.testPodName" -}}
{{- include "quantcore.joinName" (dict "prefix" (include "quantcore.fullname" .root) "suffix" (printf "test-%s" .name) "max" 63) -}}
{{- end -}}

{{/* Fails unless .name is a valid object name of its kind. Names derive from the release name (or
     fullnameOverride), which Helm only requires to be a DNS-1123 subdomain: dots and a leading
     digit pass Helm but not the API server or KubeRay for some kinds.
     ctx: dict root, name, rule ("dns1035" | "label" | "subdomain"), max, what (the object, for
     the message), why (what needs the rule) */}}
{{- define "quantcore.checkName" -}}
{{- $rules := dict
    "dns1035" (list "^[a-z]([-a-z0-9]*[a-z0-9])?$" "a DNS-1035 label (lowercase letters, digits and '-', starting with a letter, no dots)")
    "label" (list "^[a-z0-9]([-a-z0-9]*[a-z0-9])?$" "a DNS-1123 label (lowercase letters, digits and '-', no dots)")
    "subdomain" (list "^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$" "a DNS-1123 subdomain") -}}
{{- $rule := get $rules .rule -}}
{{- if or (not (regexMatch (index $rule 0) .name)) (gt (len .name) (int .max)) -}}
{{- $origin := printf "the release name %q" .root.Release.Name -}}
{{- with .root.Values.fullnameOverride }}{{ $origin = printf "fullnameOverride %q" . }}{{ end -}}
{{- fail (printf "%s: %s %q must be %s of at most %d characters (%s). Choose a release name that starts with a letter and has no dots, or set fullnameOverride" $origin .what .name (index $rule 1) (int .max) .why) -}}
{{- end -}}
{{- end -}}

{{/* The chart's own labels (what selectors and tools rely on). ctx: root */}}
{{- define "quantcore.chartLabels" -}}
app.kubernetes.io/name: {{ include "quantcore.name" . }}
app.kubernetes.io/instance: {{ .Release.Name | quote }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/part-of: quantcore
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{- end -}}

{{/* Labels of an object: the chart's labels, the release-wide `labels`, then .extra (maps merged in
     that order). A user label may not change a label the chart sets (selectors depend on them).
     ctx: dict root, component (may be ""), run (run name, may be ""), extra (map, may be nil),
     where (values path of .extra, for the error message) */}}
{{- define "quantcore.labelsFor" -}}
{{- $own := fromYaml (include "quantcore.chartLabels" .root) -}}
{{- with .component }}{{ $_ := set $own "app.kubernetes.io/component" . }}{{ end -}}
{{- with .run }}{{ $_ := set $own "quantcore.io/run" . }}{{ end -}}
{{- $out := deepCopy $own -}}
{{- range $i, $src := list (dict "labels" (default (dict) .root.Values.labels) "where" "labels") (dict "labels" (default (dict) .extra) "where" .where) -}}
{{- range $k, $v := $src.labels -}}
{{- if and (hasKey $own $k) (ne (toString (get $own $k)) (toString $v)) -}}
{{- fail (printf "%s: label %s is set by the chart (%s); choose another key" $src.where $k (get $own $k)) -}}
{{- end -}}
{{- $_ := set $out $k (toString $v) -}}
{{- end -}}
{{- end -}}
{{- toYaml $out -}}
{{- end -}}

{{/* metadata.labels of the release-wide objects (no component). ctx: root */}}
{{- define "quantcore.labels" -}}
{{- include "quantcore.labelsFor" (dict "root" . "component" "" "run" "" "extra" nil "where" "") -}}
{{- end -}}

{{/* metadata of a pod template: labels (as "quantcore.labelsFor", plus podLabels) and annotations
     (podAnnotations, then .annotations; later keys win).
     ctx: dict root, component, run, labels (map), annotations (map), where */}}
{{- define "quantcore.podMetadata" -}}
{{- $extra := merge (deepCopy (default (dict) .labels)) (deepCopy (default (dict) .root.Values.podLabels)) -}}
labels:
  {{- include "quantcore.labelsFor" (dict "root" .root "component" .component "run" .run "extra" $extra "where" (printf "%s / podLabels" .where)) | nindent 2 }}
{{- $ann := mergeOverwrite (deepCopy (default (dict) .root.Values.podAnnotations)) (deepCopy (default (dict) .annotations)) -}}
{{- range $k, $v := $ann }}{{ if kindIs "invalid" $v }}{{ $_ := unset $ann $k }}{{ end }}{{ end -}}
{{- with $ann }}
annotations:
  {{- range $k, $v := . }}
  {{ $k }}: {{ toString $v | quote }}
  {{- end }}
{{- end }}
{{- end -}}

{{- define "quantcore.image" -}}
{{- if .Values.image.digest -}}
{{- printf "%s@%s" .Values.image.repository .Values.image.digest -}}
{{- else -}}
{{- printf "%s:%s" .Values.image.repository .Values.image.tag -}}
{{- end -}}
{{- end -}}

{{/* Always for a tag (tags move: the node must not run a stale copy), IfNotPresent for a digest
(immutable); image.pullPolicy overrides. */}}
{{- define "quantcore.pullPolicy" -}}
{{- .Values.image.pullPolicy | default (ternary "IfNotPresent" "Always" (ne .Values.image.digest "")) -}}
{{- end -}}

{{/* Pod security (Kubernetes "restricted" profile; not configurable apart from the ids) -------- */}}
{{- define "quantcore.podSecurityContext" -}}
runAsNonRoot: true
runAsUser: {{ .Values.podSecurity.runAsUser }}
runAsGroup: {{ .Values.podSecurity.runAsGroup }}
fsGroup: {{ .Values.podSecurity.fsGroup }}
seccompProfile:
  type: RuntimeDefault
{{- end -}}

{{- define "quantcore.containerSecurityContext" -}}
runAsNonRoot: true
runAsUser: {{ .Values.podSecurity.runAsUser }}
runAsGroup: {{ .Values.podSecurity.runAsGroup }}
readOnlyRootFilesystem: true
allowPrivilegeEscalation: false
privileged: false
capabilities:
  drop: ["ALL"]
seccompProfile:
  type: RuntimeDefault
{{- end -}}

{{/* S3 settings as environment variables (boto3's standard names); credentials by Secret reference */}}
{{- define "quantcore.s3Env" -}}
{{- $s3 := .Values.s3 -}}
{{- if $s3.endpoint }}
- name: AWS_ENDPOINT_URL
  value: {{ $s3.endpoint | quote }}
{{- end }}
{{- if $s3.region }}
- name: AWS_DEFAULT_REGION
  value: {{ $s3.region | quote }}
- name: AWS_REGION
  value: {{ $s3.region | quote }}
{{- end }}
{{- if $s3.maxAttempts }}
- name: AWS_MAX_ATTEMPTS
  value: {{ $s3.maxAttempts | quote }}
{{- end }}
{{- if $s3.retryMode }}
- name: AWS_RETRY_MODE
  value: {{ $s3.retryMode | quote }}
{{- end }}
{{- if $s3.secretName }}
- name: AWS_ACCESS_KEY_ID
  valueFrom:
    secretKeyRef:
      name: {{ $s3.secretName }}
      key: {{ $s3.accessKeyIdKey }}
- name: AWS_SECRET_ACCESS_KEY
  valueFrom:
    secretKeyRef:
      name: {{ $s3.secretName }}
      key: {{ $s3.secretAccessKeyKey }}
{{- if $s3.sessionTokenKey }}
- name: AWS_SESSION_TOKEN
  valueFrom:
    secretKeyRef:
      name: {{ $s3.secretName }}
      key: {{ $s3.sessionTokenKey }}
{{- end }}
{{- end }}
{{- end -}}

{{/* Writable scratch volumes for a read-only root filesystem, the inline recipes, and the
     PersistentVolumeClaims of .pvcs (entries of `volumes`).
     ctx: dict root, tmpSize, cacheSize, shmSize, pvcs (list) */}}
{{- define "quantcore.scratchVolumes" -}}
- name: tmp
  emptyDir:
    sizeLimit: {{ .tmpSize }}
- name: cache
  emptyDir:
    sizeLimit: {{ .cacheSize }}
# DataLoader workers / the Ray object store use shared memory; the runtime default is 64 MiB.
- name: dshm
  emptyDir:
    medium: Memory
    sizeLimit: {{ .shmSize }}
{{- if .root.Values.recipes }}
- name: recipes
  configMap:
    name: {{ include "quantcore.fullname" .root }}-recipes
{{- end }}
{{- range .pvcs }}
- name: {{ .name }}
  persistentVolumeClaim:
    claimName: {{ .claimName }}
    readOnly: {{ include "quantcore.pvcReadOnly" . }}
{{- end }}
{{- end -}}

{{/* ctx: dict root, pvcs (list) */}}
{{- define "quantcore.scratchMounts" -}}
- name: tmp
  mountPath: /tmp
- name: cache
  mountPath: /cache
- name: dshm
  mountPath: /dev/shm
{{- if .root.Values.recipes }}
- name: recipes
  mountPath: /etc/quantcore/recipes
  readOnly: true
{{- end }}
{{- range .pvcs }}
- name: {{ .name }}
  mountPath: {{ .mountPath }}
  readOnly: {{ include "quantcore.pvcReadOnly" . }}
{{- end }}
{{- end -}}

{{/* A `volumes` entry's readOnly: true unless it says false (most volumes hold inputs). ctx: the entry */}}
{{- define "quantcore.pvcReadOnly" -}}
{{- ternary "false" "true" (and (hasKey . "readOnly") (not .readOnly)) -}}
{{- end -}}

{{/* Pod-level storage that the kubelet enforces, checked the way the RayJob template checks the
     object store: the in-memory /dev/shm counts against the memory limit, and the disk emptyDirs
     (tmp, cache: .disk) against ephemeral storage, so the scheduler must reserve room for them
     (requests.ephemeral-storage) and the limit must hold them (else the kubelet evicts the pod
     before they fill up). ctx: dict resources, where (values path of the resources), disk (list
     of dict name size), shm (dict name size, or nil) */}}
{{- define "quantcore.checkPodStorage" -}}
{{- $res := default (dict) .resources -}}
{{- if .shm -}}
{{- $mem := dig "limits" "memory" "" $res -}}
{{- if not $mem -}}
{{- fail (printf "%s.limits.memory is required: the in-memory /dev/shm (%s: %s) counts against it" .where .shm.name .shm.size) -}}
{{- end -}}
{{- $shmB := int64 (include "quantcore.bytes" (dict "q" .shm.size "where" .shm.name)) -}}
{{- if ge $shmB (int64 (include "quantcore.bytes" (dict "q" $mem "where" (printf "%s.limits.memory" .where)))) -}}
{{- fail (printf "%s (%s) must be below %s.limits.memory (%v): /dev/shm is memory of the container, and the processes need the rest" .shm.name .shm.size .where $mem) -}}
{{- end -}}
{{- end -}}
{{- if .disk -}}
{{- $names := list -}}
{{- $sum := int64 0 -}}
{{- range .disk -}}
{{- $names = append $names (printf "%s %s" .name .size) -}}
{{- $sum = add $sum (int64 (include "quantcore.bytes" (dict "q" .size "where" .name))) -}}
{{- end -}}
{{- if not (dig "requests" "ephemeral-storage" "" $res) -}}
{{- fail (printf "%s.requests.ephemeral-storage is required: the pod writes emptyDir volumes on the node's disk (%s), and the scheduler must reserve room for them" .where (join ", " $names)) -}}
{{- end -}}
{{- with dig "limits" "ephemeral-storage" "" $res -}}
{{- if lt (int64 (include "quantcore.bytes" (dict "q" . "where" (printf "%s.limits.ephemeral-storage" $.where)))) $sum -}}
{{- fail (printf "%s.limits.ephemeral-storage (%v) is below the emptyDir volumes it must hold (%s): the kubelet would evict the pod before they fill up; raise the limit or lower the sizes" $.where . (join " + " $names)) -}}
{{- end -}}
{{- end -}}
{{- end -}}
{{- /* requests and limits merge per key with defaults.resources: lowering a limit alone keeps the
       default request above it, which the API server rejects; say so at render time */ -}}
{{- range $k := list "cpu" "memory" "ephemeral-storage" -}}
{{- $req := dig "requests" $k "" $res -}}
{{- $lim := dig "limits" $k "" $res -}}
{{- if and $req $lim -}}
{{- $conv := ternary "quantcore.millicpu" "quantcore.bytes" (eq $k "cpu") -}}
{{- if gt (int64 (include $conv (dict "q" $req "where" (printf "%s.requests.%s" $.where $k)))) (int64 (include $conv (dict "q" $lim "where" (printf "%s.limits.%s" $.where $k)))) -}}
{{- fail (printf "%s: requests.%s (%v) is above limits.%s (%v); the API server would reject the pod. Requests and limits merge per key with defaults.resources: set the request too" $.where $k $req $k $lim) -}}
{{- end -}}
{{- end -}}
{{- end -}}
{{- end -}}

{{/* A recipe reference as passed to --recipe: inline recipes become their mounted path. ctx: dict root, ref */}}
{{- define "quantcore.recipeArg" -}}
{{- if hasKey .root.Values.recipes .ref -}}
{{- printf "/etc/quantcore/recipes/%s.yaml" .ref -}}
{{- else -}}
{{- .ref -}}
{{- end -}}
{{- end -}}

{{/* resources with the GPU count added. ctx: dict resources, gpus, gpuName */}}
{{- define "quantcore.resources" -}}
{{- $res := deepCopy (default (dict) .resources) -}}
{{- if gt (int .gpus) 0 -}}
{{- $req := deepCopy (default (dict) $res.requests) -}}
{{- $lim := deepCopy (default (dict) $res.limits) -}}
{{- $_ := set $req .gpuName (int .gpus) -}}
{{- $_ := set $lim .gpuName (int .gpus) -}}
{{- $_ := set $res "requests" $req -}}
{{- $_ := set $res "limits" $lim -}}
{{- end -}}
{{- toYaml $res -}}
{{- end -}}

{{/* Scheduling for a pod: GPU node selector/tolerations when it uses GPUs, plus its own; the
     priority class; the scheduler (`volcano` when a Volcano queue is set and no other name is).
     ctx: dict root, gpus, nodeSelector, tolerations, affinity, priorityClassName, schedulerName,
     volcanoQueue */}}
{{- define "quantcore.scheduling" -}}
{{- $gpu := .root.Values.gpu -}}
{{- $sel := dict -}}
{{- $tol := list -}}
{{- if gt (int .gpus) 0 -}}
{{- $sel = merge $sel (deepCopy (default (dict) $gpu.nodeSelector)) -}}
{{- /* The GPU resource's own taint (the device plugins' convention: key = resource name) is always
       tolerated; gpu.tolerations add to it (replacing that list must not leave GPU pods Pending). */ -}}
{{- $keys := list -}}
{{- range default (list) $gpu.tolerations }}{{ $keys = append $keys (toString .key) }}{{ end -}}
{{- if not (has $gpu.resourceName $keys) -}}
{{- $tol = append $tol (dict "key" $gpu.resourceName "operator" "Exists" "effect" "NoSchedule") -}}
{{- end -}}
{{- $tol = concat $tol (default (list) $gpu.tolerations) -}}
{{- end -}}
{{- $sel = mergeOverwrite $sel (deepCopy (default (dict) .nodeSelector)) -}}
{{- range $k, $v := $sel }}{{ if kindIs "invalid" $v }}{{ $_ := unset $sel $k }}{{ end }}{{ end -}}
{{- $tol = concat $tol (default (list) .tolerations) -}}
{{- with $sel }}
nodeSelector:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- with $tol }}
tolerations:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- with .affinity }}
affinity:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- with .priorityClassName }}
priorityClassName: {{ . }}
{{- end }}
{{- with (default (ternary "volcano" "" (not (empty .volcanoQueue))) .schedulerName) }}
schedulerName: {{ . }}
{{- end }}
{{- end -}}

{{/* Kueue and Volcano are alternatives: both would admit the same pods against separate quotas.
     ctx: dict queueName, volcanoQueue, where */}}
{{- define "quantcore.checkQueues" -}}
{{- if and .queueName .volcanoQueue -}}
{{- fail (printf "%s: set queueName (Kueue) or volcanoQueue (Volcano), not both" .where) -}}
{{- end -}}
{{- end -}}

{{/* Quantities ----------------------------------------------------------------------------------- */}}
{{/* A Kubernetes quantity (e.g. 8Gi, 500M, 1.5G, 1073741824) in bytes, as a decimal string.
     ctx: dict q, where */}}
{{- define "quantcore.bytes" -}}
{{- $q := toString .q -}}
{{- $m := regexFind "^[0-9]*\\.?[0-9]+" $q -}}
{{- $suffix := trimPrefix $m $q -}}
{{- $factors := dict "" 1.0 "k" 1e3 "M" 1e6 "G" 1e9 "T" 1e12 "P" 1e15 "Ki" 1024.0 "Mi" 1048576.0 "Gi" 1073741824.0 "Ti" 1099511627776.0 "Pi" 1125899906842624.0 -}}
{{- if or (not $m) (not (hasKey $factors $suffix)) -}}
{{- fail (printf "%s: %q is not a byte quantity (e.g. 8Gi, 512Mi, 16G)" .where $q) -}}
{{- end -}}
{{- printf "%d" (int64 (floor (mulf (float64 $m) (get $factors $suffix)))) -}}
{{- end -}}

{{/* A CPU quantity (e.g. 8, 500m, 1.5) in millicores, as a decimal string. ctx: dict q, where */}}
{{- define "quantcore.millicpu" -}}
{{- $q := toString .q -}}
{{- if regexMatch "^[0-9]+m$" $q -}}
{{- trimSuffix "m" $q -}}
{{- else if regexMatch "^[0-9]*\\.?[0-9]+$" $q -}}
{{- printf "%d" (int64 (floor (mulf (float64 $q) 1000.0))) -}}
{{- else -}}
{{- fail (printf "%s: %q is not a CPU quantity (e.g. 8, 500m)" .where $q) -}}
{{- end -}}
{{- end -}}

{{/* Checks of values that the schema cannot word clearly --------------------------------------- */}}
{{/* Keys of a label, annotation or node selector map: an optional DNS-subdomain prefix and "/",
     then a name of at most 63 characters. (The schema checks label values; helm reports its
     key-pattern errors at unrelated paths, hence this check.) ctx: dict m (map), where, kind */}}
{{- define "quantcore.checkKeys" -}}
{{- range $k, $_ := (default (dict) .m) -}}
{{- $parts := splitn "/" 2 $k -}}
{{- $name := ternary $parts._1 $parts._0 (contains "/" $k) -}}
{{- $prefix := ternary $parts._0 "" (contains "/" $k) -}}
{{- $ok := and (le (len $name) 63) (regexMatch "^[A-Za-z0-9]([-A-Za-z0-9_.]*[A-Za-z0-9])?$" $name) -}}
{{- if contains "/" $k -}}
{{- $ok = and $ok (le (len $prefix) 253) (regexMatch "^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$" $prefix) -}}
{{- end -}}
{{- if not $ok -}}
{{- fail (printf "%s: %q is not a valid %s key: an optional DNS prefix and \"/\" (e.g. example.com/), then a name of at most 63 characters - letters, digits, '-', '_' and '.', beginning and ending with a letter or digit" $.where $k $.kind) -}}
{{- end -}}
{{- end -}}
{{- end -}}

{{/* The PersistentVolumeClaims of one pod (release-wide `volumes` + the workload's own): unique
     names and mount paths, none taking the place of the chart's own volumes. ctx: dict vols, where */}}
{{- define "quantcore.checkVolumes" -}}
{{- $names := dict -}}
{{- $paths := dict -}}
{{- range $i, $v := .vols -}}
{{- if has $v.name (list "tmp" "cache" "dshm" "recipes" "sweep") -}}
{{- fail (printf "%s: volume name %q is the chart's own (tmp, cache, dshm, recipes, sweep): choose another" $.where $v.name) -}}
{{- end -}}
{{- if hasKey $names $v.name -}}
{{- fail (printf "%s: two volumes are named %q: a pod's volume names must be unique (release-wide `volumes` and the workload's own are mounted together)" $.where $v.name) -}}
{{- end -}}
{{- $_ := set $names $v.name true -}}
{{- range list "/tmp" "/cache" "/dev/shm" "/etc/quantcore" -}}
{{- if or (eq $v.mountPath .) (hasPrefix (printf "%s/" .) $v.mountPath) (hasPrefix (printf "%s/" $v.mountPath) .) -}}
{{- fail (printf "%s: volume %s's mountPath %s collides with the chart's %s (scratch space, shared memory, recipes): mount it elsewhere, e.g. under /mnt" $.where $v.name $v.mountPath .) -}}
{{- end -}}
{{- end -}}
{{- /* The image's own files (/opt/venv, /opt/python, /opt/quantcore) and the system directories: a
       volume there hides what every pod runs. The same list as jobs/components.py SYSTEM_PATHS. */ -}}
{{- range list "/bin" "/boot" "/dev" "/etc" "/lib" "/lib32" "/lib64" "/opt" "/proc" "/root" "/run" "/sbin" "/sys" "/usr" "/var" -}}
{{- if or (eq $v.mountPath .) (hasPrefix (printf "%s/" .) $v.mountPath) -}}
{{- fail (printf "%s: volume %s's mountPath %s is inside %s, where the image's own files or system directories would be hidden (/opt holds the Python environment and quantcore's code): mount it elsewhere, e.g. under /mnt" $.where $v.name $v.mountPath .) -}}
{{- end -}}
{{- end -}}
{{- if hasKey $paths $v.mountPath -}}
{{- fail (printf "%s: volumes %s and %s are both mounted at %s" $.where (get $paths $v.mountPath) $v.name $v.mountPath) -}}
{{- end -}}
{{- $_ := set $paths $v.mountPath $v.name -}}
{{- end -}}
{{- end -}}

{{/* A local path (/… or file:///…) must lie on a volume mounted into the pods that use it (the
     chart mounts PersistentVolumeClaims only: the namespace enforces the restricted Pod Security
     profile, which forbids hostPath), and a path written to must be on a writable one.
     .roots: other directories or files the pods have (the inline recipes, /cache). Renders
     nothing. ctx: dict uri, field (values path), write (bool), vols (list), roots (list), hint
     (where volumes can be added) */}}
{{- define "quantcore.checkLocalPath" -}}
{{- $uri := toString .uri -}}
{{- $low := lower $uri -}}
{{- $path := "" -}}
{{- /* every local spelling quantcore reads (quantcore/io/uri.py): /p, file:///p, file://localhost/p, file:/p */ -}}
{{- if hasPrefix "s3://" $low -}}
{{- else if hasPrefix "file://localhost/" $low }}{{ $path = substr 16 -1 $uri }}
{{- else if hasPrefix "file://" $low }}{{ $path = substr 7 -1 $uri }}
{{- else if hasPrefix "file:/" $low }}{{ $path = substr 5 -1 $uri }}
{{- else if hasPrefix "/" $uri }}{{ $path = $uri }}
{{- else if contains "://" $uri }}{{ fail (printf "%s: %s: unsupported URI scheme (quantcore reads local paths, file:// and s3:// URIs)" .field $uri) }}
{{- else if and $uri (or (not .named) (hasSuffix ".yaml" $low) (hasSuffix ".yml" $low)) }}{{ fail (printf "%s: %s is a relative path; in the pod it would resolve into a read-only folder (the image's working directory, or the chart's config for a sweep file), which holds no data or runs%s: give an absolute path on a volume under %s, or an s3:// URI" .field $uri (ternary " (a recipe is a built-in name, a key of `recipes`, an absolute .yaml path or an s3:// URI)" "" (default false .named)) .hint) }}
{{- end -}}
{{- if and $path (not (hasPrefix "/" $path)) }}{{ fail (printf "%s: %s: a file URI names an absolute path on this machine (file:///p)" .field $uri) }}{{ end -}}
{{- if $path -}}
{{- /* as the pod's filesystem resolves it: /mnt/d/../../etc/x is not on the volume at /mnt/d */ -}}
{{- $path = clean $path -}}
{{- $on := dict -}}
{{- range .vols -}}
{{- if and (or (eq $path .mountPath) (hasPrefix (printf "%s/" .mountPath) $path)) (gt (len .mountPath) (len (default "" $on.mountPath))) }}{{ $on = . }}{{ end -}}
{{- end -}}
{{- $inRoot := false -}}
{{- range .roots }}{{ if or (eq $path .) (hasPrefix (printf "%s/" .) $path) }}{{ $inRoot = true }}{{ end }}{{ end -}}
{{- if and (not $on) (not $inRoot) -}}
{{- $mounted := list -}}
{{- range .vols }}{{ $mounted = append $mounted .mountPath }}{{ end -}}
{{- fail (printf "%s: %s is a local path, but no volume is mounted above it (mounted: %s). Add the PersistentVolumeClaim that holds it under %s, e.g. {name: datasets, claimName: <pvc>, mountPath: /mnt/datasets}, or use an s3:// URI" .field $uri (default "none" (join ", " $mounted)) .hint) -}}
{{- end -}}
{{- if and $on .write (eq (include "quantcore.pvcReadOnly" $on) "true") -}}
{{- fail (printf "%s: %s is written to volume %s (claim %s), which is mounted read-only: set readOnly: false on that volume" .field $uri $on.name $on.claimName) -}}
{{- end -}}
{{- end -}}
{{- end -}}

{{/* A container's env must name each variable once: Kubernetes keeps the last of duplicates, so an
extraEnv entry would silently override (or be overridden by) another. .s3env: the chart's S3
variables (YAML list text), .extra: extraEnv, .where: the values path. */}}
{{- define "quantcore.checkEnv" -}}
{{- $own := dict -}}
{{- if .s3env }}{{ range fromYamlArray .s3env }}{{ $_ := set $own .name true }}{{ end }}{{ end -}}
{{- /* variables that take precedence over one the chart sets: boto3's service-specific endpoint and
       quantcore's own attempt count (quantcore/io/_s3.py) */ -}}
{{- $overrides := dict "AWS_ENDPOINT_URL_S3" "AWS_ENDPOINT_URL" "QUANTCORE_S3_MAX_ATTEMPTS" "AWS_MAX_ATTEMPTS" -}}
{{- $seen := dict -}}
{{- range $e := default (list) .extra -}}
{{- if hasKey $own $e.name -}}
{{- fail (printf "%s: %s is set by the chart from the s3.* values; set it there, not in extraEnv" $.where $e.name) -}}
{{- end -}}
{{- $over := get $overrides $e.name -}}
{{- if and $over (hasKey $own $over) -}}
{{- fail (printf "%s: %s would take precedence over %s, which the chart sets from the s3.* values (the helm test pod and the Jobs would use different settings); set it there, not in extraEnv" $.where $e.name $over) -}}
{{- end -}}
{{- if hasKey $seen $e.name -}}
{{- fail (printf "%s: %s appears more than once (Kubernetes would keep only the last)" $.where $e.name) -}}
{{- end -}}
{{- $_ := set $seen $e.name true -}}
{{- end -}}
{{- end -}}

{{/* extraArgs must not repeat a flag the chart sets from the run's values (or one another): the
command's parser would keep one of them silently (e.g. --device cpu after the chart's --device cuda
runs a GPU pod on the CPU). --no-X and --X count as one flag, and a short form as its long one
(-b8 and -b 8 as --batch-size: the CLI's short options); a flag the command does not have is refused
(files/cli-flags.yaml, generated from the commands' parsers by scripts/chart_flags.py). .args: the
chart's arguments, .extra: extraArgs, .where: the values path, .root: the chart's root context, .cmd:
the command's key in files/cli-flags.yaml, .program: how the message names it. */}}
{{- define "quantcore.checkExtraArgs" -}}
{{- $short := dict "-b" "--batch-size" "-c" "--checkpoint" "-d" "--data" "-f" "--format" "-o" "--out" "-r" "--recipe" "-s" "--split" "-j" "--workers" -}}
{{- $own := dict -}}
{{- range .args }}{{ $f := toString . }}{{ if hasPrefix "-" $f }}{{ $_ := set $own (replace "--no-" "--" (first (splitList "=" $f))) true }}{{ end }}{{ end -}}
{{- $seen := dict -}}
{{- $known := dict -}}
{{- if .cmd }}{{ $known = get (.root.Files.Get "files/cli-flags.yaml" | fromYaml) .cmd }}{{ end -}}
{{- $options := default (list) $known.options -}}
{{- $valueNext := false -}}{{- $positional := false -}}
{{- range $a := default (list) .extra -}}
{{- $raw := first (splitList "=" (toString $a)) -}}
{{- /* the value of the option before it (even "-inf" or "-w.pt"), or after "--": not a flag */ -}}
{{- $isFlag := and (hasPrefix "-" $raw) (gt (len $raw) 1) (ne $raw "--") (not $valueNext) (not $positional) (not (regexMatch "^-[0-9.]" $raw)) -}}
{{- if eq $raw "--" }}{{ $positional = true }}{{ end -}}
{{- $valueNext = false -}}
{{- if and $isFlag $options (not (has $raw $options)) (not (and (not (hasPrefix "--" $raw)) (has (substr 0 2 $raw) $options))) -}}
{{- fail (printf "%s: %s is not an option of %s (its options: %s); the pod would stop at start" $.where $raw $.program (join " " $options)) -}}
{{- end -}}
{{- if and $isFlag (has $raw (default (list) $known.with_value)) (not (contains "=" (toString $a))) }}{{ $valueNext = true }}{{ end -}}
{{- if not $isFlag }}{{ continue }}{{ end -}}
{{- $f := replace "--no-" "--" $raw -}}
{{- if and (hasPrefix "-" $f) (not (hasPrefix "--" $f)) (ge (len $f) 2) }}{{ $f = default $f (get $short (substr 0 2 $f)) }}{{ end -}}
{{- if and (hasPrefix "-" $f) (hasKey $own $f) -}}
{{- fail (printf "%s: %s is set by the chart from this run's values; set that value instead (a repeated flag would leave one of them silently unused)" $.where (toString $a)) -}}
{{- end -}}
{{- if and (hasPrefix "-" $f) (hasKey $seen $f) -}}
{{- fail (printf "%s: %s appears more than once; give it once" $.where $f) -}}
{{- end -}}
{{- if hasPrefix "-" $f }}{{ $_ := set $seen $f true }}{{ end -}}
{{- end -}}
{{- end -}}
