<#
.SYNOPSIS
  vmss-healer-agent for Windows: publishes this VM's heartbeat (design §2) to the healer's Event
  Grid topic. A line-by-line mirror of the Linux agent (infra/agent/vmss-healer-agent); keep the two
  in step.

.DESCRIPTION
  vmss-healer-agent.ps1 run                      publish every HEALER_INTERVAL, forever
  vmss-healer-agent.ps1 once                     publish one heartbeat; exit 1 if it could not
  vmss-healer-agent.ps1 maintenance <duration>   MAINTENANCE until now + duration, sent at once
  vmss-healer-agent.ps1 maintenance off          back to reporting health
  vmss-healer-agent.ps1 config                   print the effective settings
  vmss-healer-agent.ps1 prepare-image            generalize this VM (Sysprep) so that its OS disk can
                                                 become a golden image (Administrator; idempotent;
                                                 run by the healer's `handler prototype`)

  Drains like the Linux agent: for this VM's scheduled Terminate, Reboot, Redeploy or Preempt
  (IMDS scheduled events), HEALER_DRAIN_FILE exists, DRAINING is published until the event's
  NotBefore, HEALER_DRAIN_COMMAND runs bounded by it, and the event is approved.

  Settings: the same HEALER_* variables as the Linux agent, from the environment or from
  %ProgramData%\vmss-healer\agent.env (KEY="value" lines, written by install.ps1). Identity and the
  Entra token come from IMDS (managed identity, role EventGrid Data Sender): no keys on the VM.
  Logs go to the Application event log, source "vmss-healer-agent".

  This script cannot run on the project's Linux CI; its logic mirrors the tested Linux agent.
#>
param(
    [Parameter(Position = 0)][string]$Command = 'run',
    [Parameter(Position = 1)][string]$Argument = ''
)

$ErrorActionPreference = 'Stop'
Set-StrictMode -Version 3

$TokenResource = 'https://eventgrid.azure.net'
$EventType = 'VmssHealer.Heartbeat'
$TokenMarginSeconds = 300
$StateDir = if ($env:HEALER_STATE_DIR) { $env:HEALER_STATE_DIR } else { Join-Path $env:ProgramData 'vmss-healer' }
$EnvFile = if ($env:HEALER_AGENT_ENV) { $env:HEALER_AGENT_ENV } else { Join-Path $StateDir 'agent.env' }
$MaintenanceFile = Join-Path $StateDir 'maintenance-until'
# "<NotBefore, unix seconds> <event type> <event id>" while a scheduled event of this VM is pending.
$DrainState = Join-Path $StateDir 'drain-until'
$EventsApi = '/metadata/scheduledevents?api-version=2020-07-01'
# A Preempt gives 30 s notice ("Scheduled Events for Windows VMs", minimum notice per event type).
$EventsEveryMs = 10000
# A drain state older than its NotBefore by this much is over, whatever IMDS says.
$DrainGraceSeconds = 600

function Write-Log([string]$Level, [string]$Message) {
    $type = switch ($Level) { 'error' { 'Error' } 'warn' { 'Warning' } default { 'Information' } }
    try { Write-EventLog -LogName Application -Source 'vmss-healer-agent' -EventId 1 -EntryType $type -Message $Message }
    catch { }
    [Console]::Error.WriteLine("$Level $Message")
}

# Same format as the Linux agent: KEY="value", \\ and \" escaped, never expanded; set variables win.
function Import-EnvFile([string]$Path) {
    if (-not (Test-Path $Path)) { return }
    foreach ($line in Get-Content $Path) {
        if ($line -notmatch '^\s*([A-Za-z_][A-Za-z0-9_]*)=(.*)$') { continue }
        $key = $Matches[1]; $value = $Matches[2]
        if ([Environment]::GetEnvironmentVariable($key)) { continue }
        if ($value -match '^"(.*)"\s*$') { $value = $Matches[1].Replace('\"', '"').Replace('\\', '\') }
        [Environment]::SetEnvironmentVariable($key, $value)
    }
}

function ConvertTo-Milliseconds([string]$Text) {
    if ($Text -notmatch '^(\d+)(\.(\d{1,3}))?(s|m|h)?$') { return $null }
    $ms = [int64]$Matches[1] * 1000 + [int64]($Matches[3] + '000').Substring(0, 3)
    switch ($Matches[4]) { 'm' { $ms *= 60 } 'h' { $ms *= 3600 } }
    return $ms
}

Import-EnvFile $EnvFile
$Imds = if ($env:HEALER_IMDS_ENDPOINT) { $env:HEALER_IMDS_ENDPOINT.TrimEnd('/') } else { 'http://169.254.169.254' }
$Topic = $env:HEALER_TOPIC_ENDPOINT
$HealthUrl = $env:HEALER_HEALTH_URL
$HealthCommand = $env:HEALER_HEALTH_COMMAND
$Schema = if ($env:HEALER_SCHEMA) { $env:HEALER_SCHEMA } else { 'eventgrid' }
$Attest = $env:HEALER_ATTEST -in @('true', '1', 'yes')
$DrainCommand = $env:HEALER_DRAIN_COMMAND
$DrainFile = if ($env:HEALER_DRAIN_FILE) { $env:HEALER_DRAIN_FILE } else { Join-Path $StateDir 'draining' }
# Drive roots (F:\) or mounted folders (C:\data) that must be there before the application counts:
# STARTING until then (a stateful VM waiting for the data disk the healer carries to it).
$RequireMount = @(if ($env:HEALER_REQUIRE_MOUNT) { $env:HEALER_REQUIRE_MOUNT -split '\s+' | Where-Object { $_ } })

# ---- a golden image from this VM (issue 17) ----
# Windows' own generalization: Sysprep removes what makes the installation this machine's (SID,
# computer name, drivers' state), and the next boot goes through OOBE — so the VM must be reimaged
# to serve again, which the healer does. /quit, not /shutdown: the healer deallocates it. A VM
# already generalized is not generalized twice (Sysprep refuses a second pass).
function Invoke-PrepareImage {
    $principal = [Security.Principal.WindowsPrincipal][Security.Principal.WindowsIdentity]::GetCurrent()
    if (-not $principal.IsInRole([Security.Principal.WindowsBuiltInRole]::Administrator)) {
        Write-Log error 'prepare-image clears machine state: run it as Administrator'
        exit 2
    }
    foreach ($file in @($MaintenanceFile, $DrainState, $DrainFile)) { Remove-Item -Force -ErrorAction SilentlyContinue $file }
    Get-ChildItem -Path $StateDir -Filter 'event-*' -ErrorAction SilentlyContinue | Remove-Item -Force -ErrorAction SilentlyContinue
    $state = (Get-ItemProperty -Path 'HKLM:\SOFTWARE\Microsoft\Windows\CurrentVersion\Setup\State' -ErrorAction SilentlyContinue).ImageState
    if ($state -ne 'IMAGE_STATE_GENERALIZE_RESEAL_TO_OOBE') {
        $sysprep = Join-Path $env:SystemRoot 'System32\Sysprep\sysprep.exe'
        $run = Start-Process -FilePath $sysprep -ArgumentList '/generalize', '/oobe', '/quit', '/mode:vm' -Wait -PassThru
        if ($run.ExitCode -ne 0) { Write-Log error "sysprep failed (exit $($run.ExitCode)): the image would keep this VM's identity"; exit 1 }
    }
    # The healer reads this line from the command's output.
    'vmss-healer-agent: machine-specific state cleared (sysprep generalize; reimage to serve again)'
}
if ($Command -eq 'prepare-image') { Invoke-PrepareImage; exit 0 }

# ---- settings, all problems at once ----
$problems = @()
if (-not $Topic) { $problems += "HEALER_TOPIC_ENDPOINT is required: the topic's .../api/events URL" }
elseif ($Topic -notmatch '^https://' -and $Topic -notmatch '^http://(127\.0\.0\.1|localhost)[:/]') {
    $problems += 'HEALER_TOPIC_ENDPOINT must be https:// (the bearer token must not travel in clear)'
}
if ($HealthUrl -and $HealthCommand) { $problems += 'set HEALER_HEALTH_URL or HEALER_HEALTH_COMMAND, not both' }
$IntervalMs = ConvertTo-Milliseconds $(if ($env:HEALER_INTERVAL) { $env:HEALER_INTERVAL } else { '60' })
if (-not $IntervalMs) { $problems += "HEALER_INTERVAL: '$($env:HEALER_INTERVAL)' is not a duration above zero" }
$HealthTimeoutMs = ConvertTo-Milliseconds $(if ($env:HEALER_HEALTH_TIMEOUT) { $env:HEALER_HEALTH_TIMEOUT } else { '5' })
if (-not $HealthTimeoutMs) { $problems += "HEALER_HEALTH_TIMEOUT: '$($env:HEALER_HEALTH_TIMEOUT)' is not a duration above zero" }
foreach ($path in $RequireMount) {
    if (-not [System.IO.Path]::IsPathRooted($path)) { $problems += "HEALER_REQUIRE_MOUNT: '$path' is not an absolute path" }
}
if ($Schema -notin @('eventgrid', 'cloudevents')) { $problems += "HEALER_SCHEMA: '$Schema' is not eventgrid or cloudevents" }
if ($problems.Count -gt 0) {
    Write-Log error "invalid configuration ($($problems.Count) problem(s)):"
    foreach ($p in $problems) { Write-Log error "  - $p" }
    exit 2
}
if ($Topic -notmatch 'api-version=') { $Topic += $(if ($Topic.Contains('?')) { '&' } else { '?' }) + 'api-version=2018-01-01' }

$script:Token = $null
# The HTTP status of a failed web request, or $null when none came (connection refused, timeout:
# the very case a health check reports). Under Set-StrictMode, reading the response status off
# an exception that has no response throws inside the catch and would kill the agent.
function Get-HttpStatus($ErrorRecord) {
    $exception = $ErrorRecord.Exception
    if (-not $exception.PSObject.Properties['Response']) { return $null }
    $response = $exception.Response
    if ($null -eq $response -or -not $response.PSObject.Properties['StatusCode']) { return $null }
    return [int]$response.StatusCode
}

# A request to IMDS, which must be reached directly ("Azure Instance Metadata Service": HTTP clients
# must bypass web proxies within the VM when querying it). Windows PowerShell 5.1 has no -NoProxy
# (PowerShell 6 added it), so the request is made with a proxy of $null: no proxy for this request
# only; the topic still goes through the machine's proxy if it has one. With a body, a JSON POST.
function Invoke-Imds([string]$PathAndQuery, [int]$TimeoutSec, [string]$Body = '') {
    $request = [System.Net.HttpWebRequest]::Create("$Imds$PathAndQuery")
    $request.Proxy = $null
    $request.Headers.Add('Metadata', 'true')
    $request.Timeout = $TimeoutSec * 1000
    if ($Body) {
        $request.Method = 'POST'
        $request.ContentType = 'application/json; charset=utf-8'
        $bytes = [System.Text.Encoding]::UTF8.GetBytes($Body)
        $request.ContentLength = $bytes.Length
        $stream = $request.GetRequestStream()
        try { $stream.Write($bytes, 0, $bytes.Length) } finally { $stream.Close() }
    }
    $response = $request.GetResponse()
    try {
        $reader = New-Object System.IO.StreamReader($response.GetResponseStream(), [System.Text.Encoding]::UTF8)
        $text = $reader.ReadToEnd()
        if ($text) { return ($text | ConvertFrom-Json) } else { return $null }
    }
    finally { $response.Close() }
}

function Format-Utc([int64]$Seconds) {
    return [DateTimeOffset]::FromUnixTimeSeconds($Seconds).UtcDateTime.ToString('yyyy-MM-ddTHH:mm:ssZ')
}

$script:TokenExpires = [int64]0
$script:Identity = $null

function Get-Identity {
    if ($script:Identity) { return $true }
    try {
        $compute = Invoke-Imds '/metadata/instance/compute?api-version=2021-02-01' 5
    }
    catch { Write-Log warn "IMDS instance metadata unavailable: $($_.Exception.Message)"; return $false }
    $subject = $compute.resourceId
    if ($subject -notmatch '/virtualMachineScaleSets/.+/virtualMachines/') {
        # Flexible orchestration: name the VM under its scale set.
        if (-not $compute.vmScaleSetName) { Write-Log error 'this VM is not in a scale set (IMDS vmScaleSetName is empty)'; return $false }
        $subject = "/subscriptions/$($compute.subscriptionId)/resourceGroups/$($compute.resourceGroupName)/providers/Microsoft.Compute/virtualMachineScaleSets/$($compute.vmScaleSetName)/virtualMachines/$($compute.name)"
    }
    # Name: the VM's name as scheduled events list it (`{scale set}_{instance id}` for Uniform).
    $script:Identity = @{ Subject = $subject; VmId = $compute.vmId; ComputerName = $compute.osProfile.computerName; Name = "$($compute.name)" }
    Write-Log info "identity: $subject vmId=$($compute.vmId) computerName=$($compute.osProfile.computerName)"
    return $true
}

function Get-Token {
    $now = [DateTimeOffset]::UtcNow.ToUnixTimeSeconds()
    if ($script:Token -and ($script:TokenExpires - $now) -gt $TokenMarginSeconds) { return $true }
    try {
        $answer = Invoke-Imds "/metadata/identity/oauth2/token?api-version=2018-02-01&resource=$TokenResource" 10
    }
    catch { Write-Log warn "no token from IMDS: $($_.Exception.Message)"; return $false }
    $script:Token = $answer.access_token
    $script:TokenExpires = if ($answer.expires_on -match '^\d+$') { [int64]$answer.expires_on }
        elseif ($answer.expires_in -match '^\d+$') { $now + [int64]$answer.expires_in }
        else { $now + $TokenMarginSeconds + 60 }
    Write-Log info "token for $TokenResource obtained"
    return $true
}

# ---- drain: IMDS scheduled events, as the Linux agent reads them ----
# For this VM's Terminate, Reboot, Redeploy or Preempt: the drain file, DRAINING until NotBefore,
# the drain command bounded by it, then this VM's event (only) approved. A Freeze is only reported.
$script:EventsFailing = $false
function Watch-Events {
    if (-not (Get-Identity)) { return }
    try { $doc = Invoke-Imds $EventsApi 5 }
    catch {
        # The first read enables the service, which can take a while to answer: said once.
        if (-not $script:EventsFailing) { Write-Log warn "scheduled events unavailable: $($_.Exception.Message); retried every $($EventsEveryMs / 1000) s" }
        $script:EventsFailing = $true
        return
    }
    $script:EventsFailing = $false
    $mine = $false
    $name = $script:Identity.Name.ToLowerInvariant()
    foreach ($scheduled in @($doc.Events)) {
        if ($null -eq $scheduled) { continue }
        $resources = @($scheduled.Resources | ForEach-Object { "$_".ToLowerInvariant() })
        if ($resources -notcontains $name) { continue }
        $id = "$($scheduled.EventId)"
        if ($scheduled.EventType -in @('Terminate', 'Reboot', 'Redeploy', 'Preempt')) {
            $mine = $true
            # NotBefore is an HTTP date ("Mon, 19 Sep 2016 18:29:47 GMT"), empty once the event started.
            $until = [DateTimeOffset]::UtcNow.ToUnixTimeSeconds()
            if ("$($scheduled.NotBefore)") {
                try { $until = [DateTimeOffset]::Parse("$($scheduled.NotBefore)", [Globalization.CultureInfo]::InvariantCulture).ToUnixTimeSeconds() }
                catch { Write-Log warn "scheduled event ${id}: unreadable NotBefore '$($scheduled.NotBefore)'" }
            }
            Start-Drain $id "$($scheduled.EventType)" $until "$($scheduled.EventStatus)"
        }
        elseif ($scheduled.EventType -eq 'Freeze') {
            $seen = Join-Path $StateDir "event-$id.seen"
            if (-not (Test-Path $seen)) {
                $null = New-Item -ItemType Directory -Force -Path $StateDir
                Set-Content -Path $seen -Value ''
                Write-Log info "scheduled event ${id}: Freeze not before $($scheduled.NotBefore) (a pause of seconds; reported only)"
            }
        }
        else { Write-Log warn "scheduled event $id of unknown type '$($scheduled.EventType)': not acted on" }
    }
    if (-not $mine -and (Test-Path $DrainState)) {
        Remove-Item -Force -ErrorAction SilentlyContinue $DrainState, $DrainFile
        Write-Log info 'no scheduled event affects this VM any more: draining over'
    }
}

# Once per event, even across restarts.
function Start-Drain([string]$Id, [string]$Type, [int64]$Until, [string]$Status) {
    $null = New-Item -ItemType Directory -Force -Path $StateDir
    # A started event has no NotBefore any more: the one it was scheduled with stays the answer.
    if (Test-Path $DrainState) {
        $known = "$(Get-Content $DrainState -TotalCount 1)" -split ' '
        if ($known.Count -ge 3 -and $known[2] -eq $Id -and $known[0] -match '^\d+$') { $Until = [int64]$known[0] }
    }
    Set-Content -Path $DrainState -Value "$Until $Type $Id"
    if (-not (Test-Path $DrainFile)) { Set-Content -Path $DrainFile -Value "$Type not before $(Format-Utc $Until) (scheduled event $Id)" }
    $drained = Join-Path $StateDir "event-$Id.drained"
    if (-not (Test-Path $drained)) {
        Write-Log warn "scheduled event ${Id}: $Type not before $(Format-Utc $Until); draining"
        $null = Send-Heartbeat 10000
        if ($DrainCommand) {
            $leftMs = [math]::Max(1000, ($Until - [DateTimeOffset]::UtcNow.ToUnixTimeSeconds()) * 1000)
            $process = Start-Process -FilePath 'powershell.exe' -ArgumentList @('-NoProfile', '-Command', $DrainCommand) -PassThru -WindowStyle Hidden
            if (-not $process.WaitForExit([int]$leftMs)) { $process.Kill(); Write-Log warn "drain command stopped at the event's NotBefore, after $($leftMs / 1000) s" }
            elseif ($process.ExitCode -ne 0) { Write-Log warn "drain command exited $($process.ExitCode)" }
            else { Write-Log info 'drain command finished' }
        }
        Set-Content -Path $drained -Value ''
    }
    $approved = Join-Path $StateDir "event-$Id.approved"
    if ($Status -eq 'Scheduled' -and -not (Test-Path $approved)) {
        try {
            $null = Invoke-Imds $EventsApi 5 (ConvertTo-Json @{ StartRequests = @(@{ EventId = $Id }) } -Depth 3 -Compress)
            Set-Content -Path $approved -Value ''
            Write-Log info "scheduled event $Id approved: the platform may go on"
        }
        catch { Write-Log warn "approving scheduled event $Id failed: $($_.Exception.Message); retried" }
    }
}

# The HEALER_REQUIRE_MOUNT paths not there now: a drive root must exist, a folder must be a mount
# point (a reparse point where the disk's volume is mounted).
function Get-Unmounted {
    foreach ($path in $RequireMount) {
        $ready = $false
        if (Test-Path -LiteralPath $path) {
            if ($path -match '^[A-Za-z]:\\?$') { $ready = $true }
            else { $ready = [bool]((Get-Item -LiteralPath $path -Force).Attributes -band [System.IO.FileAttributes]::ReparsePoint) }
        }
        if (-not $ready) { $path }
    }
}

function Get-Health {
    $result = @{ Status = 'UP'; Detail = ''; Until = '' }
    if (Test-Path $DrainState) {
        $known = "$(Get-Content $DrainState -TotalCount 1)" -split ' '
        if ($known[0] -match '^\d+$' -and [int64]$known[0] + $DrainGraceSeconds -gt [DateTimeOffset]::UtcNow.ToUnixTimeSeconds()) {
            $result.Status = 'DRAINING'; $result.Until = Format-Utc ([int64]$known[0])
            $result.Detail = "scheduled event: $(if ($known.Count -ge 2) { $known[1] })"
            return $result
        }
    }
    if (Test-Path $MaintenanceFile) {
        $until = [int64](Get-Content $MaintenanceFile -TotalCount 1)
        if ($until -gt [DateTimeOffset]::UtcNow.ToUnixTimeSeconds()) {
            $result.Status = 'MAINTENANCE'
            $result.Until = [DateTimeOffset]::FromUnixTimeSeconds($until).UtcDateTime.ToString('yyyy-MM-ddTHH:mm:ssZ')
            return $result
        }
    }
    $missing = @(Get-Unmounted)
    if ($missing.Count -gt 0) {
        $result.Status = 'STARTING'
        $result.Detail = "waiting for $($missing -join ' ') to be mounted (HEALER_REQUIRE_MOUNT)"
        return $result
    }
    $timeoutS = [math]::Max(1, [math]::Ceiling($HealthTimeoutMs / 1000))
    if ($HealthUrl) {
        try { $null = Invoke-WebRequest -Uri $HealthUrl -UseBasicParsing -TimeoutSec $timeoutS }
        catch {
            $result.Status = 'DOWN'
            $code = Get-HttpStatus $_
            $result.Detail = if ($code) { "health check $HealthUrl answered $code" } else { "health check ${HealthUrl}: $($_.Exception.Message)" }
        }
    }
    elseif ($HealthCommand) {
        $process = Start-Process -FilePath 'powershell.exe' -ArgumentList @('-NoProfile', '-Command', $HealthCommand) -PassThru -WindowStyle Hidden
        if (-not $process.WaitForExit($HealthTimeoutMs)) {
            $process.Kill()
            $result.Status = 'DOWN'; $result.Detail = "health command timed out after $($HealthTimeoutMs / 1000) s"
        }
        elseif ($process.ExitCode -ne 0) {
            $result.Status = 'DOWN'; $result.Detail = "health command exited $($process.ExitCode)"
        }
    }
    if ($result.Detail.Length -gt 1000) { $result.Detail = $result.Detail.Substring(0, 1000) }
    return $result
}

function New-HeartbeatBody($Health) {
    $now = [DateTimeOffset]::UtcNow
    $data = [ordered]@{ status = $Health.Status; vmId = $script:Identity.VmId; computerName = $script:Identity.ComputerName
        # Milliseconds since the epoch: increases across restarts without a counter file.
        sequence = $now.ToUnixTimeMilliseconds() }
    if ($Health.Detail) { $data.detail = $Health.Detail }
    if ($Health.Until) { $data.until = $Health.Until }
    if ($Attest) {
        # The nonce binds the platform's signature to this reading: its time in whole seconds.
        try {
            $doc = Invoke-Imds "/metadata/attested/document?api-version=2020-09-01&nonce=$($now.ToUnixTimeSeconds())" 5
            $data.attestation = $doc.signature
        }
        catch { Write-Log warn "no attested document from IMDS; heartbeat sent without it: $($_.Exception.Message)" }
    }
    $time = $now.UtcDateTime.ToString('yyyy-MM-ddTHH:mm:ss.fffZ')
    if ($Schema -eq 'cloudevents') {
        $event = [ordered]@{ specversion = '1.0'; id = [guid]::NewGuid().ToString(); type = $EventType; source = $Topic.Split('?')[0]
            subject = $script:Identity.Subject; time = $time; datacontenttype = 'application/json'; data = $data }
        return @{ ContentType = 'application/cloudevents-batch+json; charset=utf-8'; Body = ConvertTo-Json @($event) -Depth 5 -Compress }
    }
    $event = [ordered]@{ id = [guid]::NewGuid().ToString(); eventType = $EventType; subject = $script:Identity.Subject
        eventTime = $time; dataVersion = '1'; data = $data }
    return @{ ContentType = 'application/json; charset=utf-8'; Body = ConvertTo-Json @($event) -Depth 5 -Compress }
}

# One heartbeat, with retries and backoff inside $BudgetMs. Returns whether it was published.
function Send-Heartbeat([int64]$BudgetMs) {
    $deadline = [DateTimeOffset]::UtcNow.ToUnixTimeMilliseconds() + $BudgetMs
    $wait = 1000; $attempt = 0
    while ($true) {
        $attempt++
        if ((Get-Identity) -and (Get-Token)) {
            $health = Get-Health
            $message = New-HeartbeatBody $health
            try {
                # Bytes, not a string: Windows PowerShell 5.1 encodes a string body as ISO-8859-1
                # and every non-ASCII character of a detail becomes `?`.
                $null = Invoke-WebRequest -Uri $Topic -Method Post -UseBasicParsing -TimeoutSec 10 -ContentType $message.ContentType `
                    -Headers @{ Authorization = "Bearer $($script:Token)" } -Body ([System.Text.Encoding]::UTF8.GetBytes($message.Body))
                Write-Log info "heartbeat $($health.Status) published $($health.Detail) $($health.Until)"
                return $true
            }
            catch {
                $code = Get-HttpStatus $_
                if ($code -in 401, 403) { Write-Log warn "topic refused the token ($code); fetching a new one"; $script:Token = $null }
                elseif ($code -in 400, 413) { Write-Log error "topic rejected the event ($code): $($_.Exception.Message)"; return $false }
                else { Write-Log warn "publish failed ($code): $($_.Exception.Message)" }
            }
        }
        if ([DateTimeOffset]::UtcNow.ToUnixTimeMilliseconds() + $wait -ge $deadline) {
            Write-Log error "heartbeat not published after $attempt attempt(s); next one at the next interval"
            return $false
        }
        Start-Sleep -Milliseconds $wait
        $wait = [math]::Min($wait * 2, 30000)
    }
}

switch ($Command) {
    'run' {
        Write-Log info "vmss-healer-agent starting: topic $($Topic.Split('?')[0]), interval $($IntervalMs / 1000) s"
        while ($true) {
            # Retries may use most of an interval, not all: the next reading must stay on time. The
            # agent never dies of a failed check or publish: whatever throws is logged, and the
            # next interval comes.
            try { Watch-Events; $null = Send-Heartbeat ([int64]($IntervalMs * 0.8)) }
            catch { Write-Log error "heartbeat failed: $($_.Exception.Message)" }
            # ±10 % jitter, so a fleet started together does not publish in lockstep; scheduled
            # events read every 10 s meanwhile.
            $jitter = [int64]($IntervalMs / 10)
            $left = $IntervalMs - $jitter + (Get-Random -Minimum 0 -Maximum (2 * $jitter + 1))
            while ($left -gt 0) {
                $step = [math]::Min($left, $EventsEveryMs)
                Start-Sleep -Milliseconds $step
                $left -= $step
                try { Watch-Events } catch { Write-Log error "scheduled events failed: $($_.Exception.Message)" }
            }
        }
    }
    'once' { if (Send-Heartbeat 10000) { exit 0 } else { exit 1 } }
    'config' {
        "HEALER_TOPIC_ENDPOINT=$Topic"; "HEALER_HEALTH_URL=$HealthUrl"; "HEALER_HEALTH_COMMAND=$HealthCommand"
        "HEALER_HEALTH_TIMEOUT=$($HealthTimeoutMs / 1000)"; "HEALER_INTERVAL=$($IntervalMs / 1000)"; "HEALER_SCHEMA=$Schema"; "HEALER_ATTEST=$Attest"; "HEALER_STATE_DIR=$StateDir"
        "HEALER_DRAIN_COMMAND=$DrainCommand"; "HEALER_DRAIN_FILE=$DrainFile"
    }
    'maintenance' {
        $null = New-Item -ItemType Directory -Force -Path $StateDir
        if ($Argument -eq 'off') { Remove-Item -Force -ErrorAction SilentlyContinue $MaintenanceFile; Write-Log info 'maintenance ended' }
        else {
            $ms = ConvertTo-Milliseconds $Argument
            if (-not $ms) { Write-Log error 'usage: vmss-healer-agent.ps1 maintenance <duration, e.g. 30m> | off'; exit 2 }
            $until = [DateTimeOffset]::UtcNow.ToUnixTimeSeconds() + [int64]($ms / 1000)
            Set-Content -Path $MaintenanceFile -Value $until
            Write-Log info "maintenance until $([DateTimeOffset]::FromUnixTimeSeconds($until).UtcDateTime.ToString('o'))"
        }
        # Say so now: a reboot may follow before the next interval.
        if (Send-Heartbeat 15000) { exit 0 } else { exit 1 }
    }
    default { Write-Log error "unknown command '$Command': run | once | config | maintenance <duration>|off | prepare-image"; exit 2 }
}
